"""Envoy as the data plane, with the scheduler as its endpoint picker."""

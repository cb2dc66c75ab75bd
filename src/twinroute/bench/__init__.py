"""Benchmarks (`twinroute bench NAME`): goodput and others, each in its own module."""

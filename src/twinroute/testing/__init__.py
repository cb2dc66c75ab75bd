"""Test support that ships with the package: a local Kubernetes API server (kmock-based)."""

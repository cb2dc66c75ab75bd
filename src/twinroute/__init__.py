"""twinroute: cache- and load-aware scheduling for vLLM fleets on Kubernetes."""

__version__ = "0.1.0"

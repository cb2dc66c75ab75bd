"""Cluster simulator: vLLM-like instances behind the live routing core, fed by public traces."""

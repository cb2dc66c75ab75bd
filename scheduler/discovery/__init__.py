"""Endpoint discovery: where the scheduler learns which engines exist.

Every source is an `EndpointSource`: an async iterator of complete membership snapshots (never
deltas), so a consumer that misses one loses nothing. `run_discovery` feeds them into the
scheduler. Sources: `StaticSource` (flag list), `WatchedFileSource` (YAML file, re-read on
change) and `KubernetesSource` (the pool's pods, watched by label selector).
"""

from __future__ import annotations

from twinroute.scheduler.discovery.base import EndpointSource, run_discovery
from twinroute.scheduler.discovery.kubernetes import KubernetesSource, pod_endpoint
from twinroute.scheduler.discovery.static import (
    StaticSource,
    WatchedFileSource,
    load_endpoints_file,
    parse_endpoint_list,
)

__all__ = [
    "EndpointSource",
    "KubernetesSource",
    "StaticSource",
    "WatchedFileSource",
    "load_endpoints_file",
    "parse_endpoint_list",
    "pod_endpoint",
    "run_discovery",
]

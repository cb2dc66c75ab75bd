"""Routing policies: DualMap and the baselines it is measured against.

`make_policy(name, config=...)` is the only way the scheduler and the simulator obtain one, so
nothing else needs to know the classes (no downcasting by name).
"""

from __future__ import annotations

import importlib

from twinroute.scheduler.policies.base import Policy, PolicyConfig

from twinroute.vocabulary import BASELINE_POLICY_NAMES, POLICY_NAMES

# name -> "module:Class", imported on first use so a policy's dependencies load only if chosen.
_REGISTRY: dict[str, str] = {
    "dualmap": "twinroute.scheduler.policies.dualmap:DualMapPolicy",
    "round_robin": "twinroute.scheduler.policies.round_robin:RoundRobinPolicy",
    "least_loaded": "twinroute.scheduler.policies.least_loaded:LeastLoadedPolicy",
    "consistent_hash": "twinroute.scheduler.policies.consistent_hash:ConsistentHashPolicy",
    "chwbl": "twinroute.scheduler.policies.chwbl:ChwblPolicy",
    "cache_aware": "twinroute.scheduler.policies.cache_aware:CacheAwarePolicy",
    "min_ttft": "twinroute.scheduler.policies.min_ttft:MinTtftPolicy",
    "preble": "twinroute.scheduler.policies.preble:PreblePolicy",
}

# The names are the shared vocabulary's (the operator validates against the same tuple).
if tuple(_REGISTRY) != POLICY_NAMES:
    raise ImportError("every name of twinroute.vocabulary.POLICY_NAMES needs exactly one class")


def make_policy(name: str, *, config: PolicyConfig | None = None) -> Policy:
    """A fresh policy object; raises ValueError naming the choices for an unknown name."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}"
        ) from None
    module_name, class_name = target.split(":")
    policy_class: type[Policy] = getattr(importlib.import_module(module_name), class_name)
    return policy_class(config=config or PolicyConfig())


__all__ = ["BASELINE_POLICY_NAMES", "POLICY_NAMES", "Policy", "PolicyConfig", "make_policy"]

"""The step-cost model of a simulated instance: the scheduler's own `CostModel`.

Sharing one cost model between the instances and the TTFT estimator is deliberate: the
simulator then measures routing decisions, not a gap between two models of the hardware.
"""

from __future__ import annotations

from twinroute.scheduler.costmodel import COST_PROFILES, CostModel
from twinroute.simulator.profiles import InstanceProfile


def cost_model_for(profile: InstanceProfile) -> CostModel:
    try:
        model = COST_PROFILES[profile.cost_profile]
    except KeyError:
        raise ValueError(
            f"profile {profile.name!r} names cost profile {profile.cost_profile!r}, which "
            f"twinroute.scheduler.costmodel does not define ({sorted(COST_PROFILES)})"
        ) from None
    return model

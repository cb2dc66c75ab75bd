"""How fast a calibration follows an engine that slows down 3x: first tokens until its fitted
scale is within 10% of the new one (noise +-5%, prompts of 64-8192 uncached tokens).

    .venv/bin/python follow_slowdown.py                  # twinroute's calibration
    git show ca0a483:scheduler/calibration.py > mean_fit.py
    .venv/bin/python follow_slowdown.py mean_fit.py      # the fit of the mean before it
"""

import random
import sys
from pathlib import Path

from twinroute.scheduler.costmodel import LLAMA3_8B_H100 as PRIOR
from twinroute.scheduler.types import EMPTY_LOAD

# One loader for a calibration module given by path, the replay's.
sys.path.insert(0, str(Path(__file__).parent / "first-tokens"))
from replay import calibration_module


def feed(calibration, engine, requests: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(requests):
        uncached = rng.randint(64, 8192)
        predicted = calibration.model_for("e0").estimate_ttft_s(
            uncached_tokens=uncached, cached_tokens=0, load=EMPTY_LOAD
        )
        observed = engine.estimate_ttft_s(
            uncached_tokens=uncached, cached_tokens=0, load=EMPTY_LOAD
        ) * (1 + rng.uniform(-0.05, 0.05))
        calibration.observe(
            "e0",
            work_s=calibration.work_s("e0", predicted),
            predicted_ttft_s=predicted,
            observed_ttft_s=observed,
        )


for path in sys.argv[1:] or [None]:
    calibration = calibration_module(path).CostCalibration(prior=PRIOR)
    feed(calibration, PRIOR.calibrated(time_scale=2.0, overhead_s=0.01), 300, seed=0)
    slow = PRIOR.calibrated(time_scale=6.0, overhead_s=0.01)
    seen = 0
    while calibration.fitted()["e0"][1] < 5.4 and seen < 5000:
        feed(calibration, slow, 10, seed=seen)
        seen += 10
    print(f"{path or 'twinroute'}: within 10% of a 3x slowdown after {seen} first tokens")

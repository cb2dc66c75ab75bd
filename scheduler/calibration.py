"""Per-endpoint cost models fitted online from the first tokens the engines really produce.

A cost profile (`scheduler/costmodel.py`) describes one model on one accelerator. On any other
hardware, model size or engine configuration its predictions are off by an unknown factor,
and the SLO switch then fires at the wrong moments (never, on a fast GPU under a CPU profile;
always, the other way round). The profile is therefore only a prior: each endpoint gets its
own model, fitted from what it does.

The fit. Every prediction of the cost model is linear in its time parameters: a fixed
overhead per forward pass plus work that scales with the hardware's slowness (dense prefill,
attention, decode steps interleaved with the prefill). So an endpoint's model is the prior
with two numbers changed:

    predicted TTFT = overhead_s + time_scale * work_s

where `work_s` is the prior's prediction less the prior's own overhead, for the request's
uncached tokens and the decode work it shares steps with (`CostModel.calibrated` scales every
rate and decode cost by `time_scale` and replaces the overhead). For each request whose first
token is reported and which found its engine idle (no other lease of ours open there, and the
last fresh scrape saw nothing running or waiting), (work_s at the pick, observed TTFT) is one
observation; observed TTFT is what the scheduler sees between placing the request
and its first-token report, so the router's hop and the engine's HTTP front end count as
overhead, as the client feels them. Requests that shared the engine are left out of the fit on
purpose: their TTFT also carries the queue estimate's errors (batching the fluid model does not
know, KV memory waits, other routers' traffic), and fitted into the speed those errors would
inflate every prediction, queued or not (measured in the simulator: overheads of seconds);
the lease queue corrects itself from the first-token reports instead. Under sustained load
idle moments are rare, and the fit keeps what it learnt when they were not.

Estimator: exponentially weighted least squares of the *relative* error (each observation
weighs 1 / observed^2, so a 20 ms first token missed by 10 ms counts as much as a 2 s one
missed by 1 s; observed as no less than half the fit's prediction, so a first token reported
absurdly early cannot outweigh the rest; its weight decays by `decay` per later observation: an
effective memory of 1 / (1 - decay) requests, so the model follows an engine that slows down
under a different mix), ridge-regularised towards a prior with the weight of `prior_weight`
observations, so few or uninformative observations (all of one size) leave the prior nearly
untouched; the prior's weight decays as the observations' do, so it does not bias a
well-observed fit. Two levels: a pool fit over every endpoint's observations, shrunk towards
the profile (overhead = the profile's, scale = 1), and one fit per endpoint, shrunk towards the
pool fit. An endpoint not yet observed (just added, or one whose requests all failed) is
predicted with the pool fit, not the raw profile: otherwise an observed endpoint on fast
hardware would look faster than its identical, unobserved peers, and none of them would get
traffic to be observed with. Robust: once `robust_after` observations are in, each also weighs
1 / |its relative residual| against the fit as it stands (at least `robust_floor`), one step of
iteratively reweighted least squares per observation, which makes the fit one of median rather
than mean relative error. Delays on a busy host are one-sided: first tokens are late far more
often, and by far more, than they are early (measured on two real vLLM CPU engines sharing a
2-core machine with the router and the load generator: small prompts' first tokens ran from 17
ms (p10) through 23 ms (p50) to 78 ms (p90)). A fit of the mean sat above most of them: there
its predictions were 35% off (median) after a minute, 22% with this fit. A request that waited
behind a stalled engine does not drag it either. The price: a level shift looks like outliers
at first, so an engine that slows down 3x is followed to within 10% after about 530 first
tokens (300 for the fit of the mean). The scale stays within [`MIN_SCALE`, `MAX_SCALE`] and the
overhead within [0, `MAX_OVERHEAD_S`].

Quality is reported, not assumed: the median absolute percentage error of the predictions
made at pick time against the TTFTs observed, over the last `error_window` first tokens, per
endpoint and pool-wide (`twinroute_scheduler_ttft_prediction_error_ratio`).

Cost: O(1) per observation (a 2x2 solve) and per lookup (one dict read); the fitted model is
rebuilt only when an observation arrives.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from twinroute.scheduler.costmodel import CostModel

MIN_SCALE = 0.01
MAX_SCALE = 1000.0
MAX_OVERHEAD_S = 30.0
# Observations weigh as if at least this long (relative errors of nothing are no measure).
_MIN_SIZE_S = 1e-4


@dataclass(frozen=True, slots=True)
class CalibrationSettings:
    decay: float = 0.99
    prior_weight: float = 4.0
    robust_after: int = 16
    # Relative residuals below this weigh as this: an observation the fit already matches
    # within 5% weighs at most 20 times one it misses by 100%.
    robust_floor: float = 0.05
    error_window: int = 512
    # An endpoint is predicted with its own fit from this many observations on, with the
    # pool's before: a handful of first tokens must not make one of several identical
    # engines look faster than the others (and take every tie) by chance.
    own_fit_after: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.prior_weight <= 0 or self.error_window <= 0 or self.robust_floor <= 0:
            raise ValueError("prior_weight, robust_floor and error_window must be positive")


@dataclass(slots=True)
class _Fit:
    """Decayed sums of one endpoint's (or the pool's) observations, and the model they give."""

    model: CostModel
    overhead_s: float
    time_scale: float
    errors: deque[float]
    # Decayed count of the observations, and decayed sums of their weights and weighted terms.
    count: float = 0.0
    weight: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0
    observations: int = 0


class CostCalibration:
    """The fitted cost model of every endpoint, and of the pool for those not yet observed."""

    def __init__(self, *, prior: CostModel, settings: CalibrationSettings | None = None) -> None:
        self.prior = prior
        self.settings = settings or CalibrationSettings()
        self._pool = self._new_fit(overhead_s=prior.step_overhead_s, time_scale=1.0)
        self._fits: dict[str, _Fit] = {}
        # Endpoint -> its model, read on every pick; endpoints not observed get the pool's.
        self.models = _FittedModels(pool=prior)

    def _new_fit(self, *, overhead_s: float, time_scale: float) -> _Fit:
        return _Fit(
            model=self.prior,
            overhead_s=overhead_s,
            time_scale=time_scale,
            errors=deque(maxlen=self.settings.error_window),
        )

    def model_for(self, endpoint_id: str) -> CostModel:
        return self.models.get(endpoint_id)

    def work_s(self, endpoint_id: str, predicted_ttft_s: float) -> float:
        """The prior-hardware work behind a prediction made with the endpoint's model now:
        the inverse of `overhead_s + time_scale * work_s`."""
        model = self.models.get(endpoint_id)
        scale = self.prior.linear_tokens_per_s / model.linear_tokens_per_s
        return max(0.0, (predicted_ttft_s - model.step_overhead_s) / scale)

    def observe(
        self,
        endpoint_id: str,
        *,
        work_s: float,
        predicted_ttft_s: float,
        observed_ttft_s: float,
        fits: bool = True,
    ) -> None:
        """One reported first token: `work_s` and `predicted_ttft_s` as at the pick. Every
        one counts in the prediction error; only those with `fits` teach the fit."""
        if observed_ttft_s <= 0 or work_s < 0:
            return
        error = abs(predicted_ttft_s - observed_ttft_s) / observed_ttft_s
        pool = self._pool
        if not fits:
            pool.errors.append(error)
            fit = self._fits.get(endpoint_id)
            if fit is None:
                fit = self._fits[endpoint_id] = self._new_fit(
                    overhead_s=pool.overhead_s, time_scale=pool.time_scale
                )
            fit.errors.append(error)
            return
        self._update(
            pool, work_s, observed_ttft_s, error, towards=(self.prior.step_overhead_s, 1.0)
        )
        self.models.pool = pool.model
        fit = self._fits.get(endpoint_id)
        if fit is None:
            fit = self._fits[endpoint_id] = self._new_fit(
                overhead_s=pool.overhead_s, time_scale=pool.time_scale
            )
        self._update(
            fit, work_s, observed_ttft_s, error, towards=(pool.overhead_s, pool.time_scale)
        )
        if fit.observations >= self.settings.own_fit_after:
            self.models[endpoint_id] = fit.model

    def _update(
        self,
        fit: _Fit,
        work_s: float,
        observed_ttft_s: float,
        error: float,
        *,
        towards: tuple[float, float],
    ) -> None:
        settings = self.settings
        fit.errors.append(error)
        y = observed_ttft_s
        expected = fit.overhead_s + fit.time_scale * work_s
        # Relative to the observation, but never to less than half the fit's prediction: a
        # first token reported absurdly early (a clock step, a report racing its pick) must
        # not outweigh all the others (with 1 / y^2 one 10 us report undid 200 good ones).
        size = max(y, 0.5 * expected, _MIN_SIZE_S)
        weight = 1.0 / (size * size)
        if fit.observations >= settings.robust_after:
            weight /= max(abs(y - expected) / size, settings.robust_floor)
        decay = settings.decay
        fit.count = fit.count * decay + 1.0
        fit.weight = fit.weight * decay + weight
        fit.sum_x = fit.sum_x * decay + weight * work_s
        fit.sum_y = fit.sum_y * decay + weight * y
        fit.sum_xx = fit.sum_xx * decay + weight * work_s * work_s
        fit.sum_xy = fit.sum_xy * decay + weight * work_s * y
        fit.observations += 1
        fit.overhead_s, fit.time_scale = self._solve(fit, towards=towards)
        fit.model = self.prior.calibrated(time_scale=fit.time_scale, overhead_s=fit.overhead_s)

    def _solve(self, fit: _Fit, *, towards: tuple[float, float]) -> tuple[float, float]:
        """Ridge least squares for (overhead a, scale s) towards `towards` = (a0, s0):

        minimise sum w (y - a - s x)^2 + k w' (a - a0)^2 + k w' m (s - s0)^2, where w' is the
        observations' mean weight and m their weighted mean squared work, so that the prior
        weighs like k observations on both, and k decays with the observations."""
        # The prior's pseudo-observations age like real ones (a constant weight would bias the
        # fit for ever, against a memory of 1 / (1 - decay) observations); a hundredth of it
        # stays, so a long run of same-sized requests still has a unique solution.
        settings = self.settings
        k = settings.prior_weight * max(settings.decay**fit.observations, 0.01)
        if fit.count > 0:
            k *= fit.weight / fit.count
        a0, s0 = towards
        mean_xx = fit.sum_xx / fit.weight if fit.weight > 0 else 0.0
        k_scale = k * max(mean_xx, 1e-12)
        # [W + k, Sx; Sx, Sxx + k m] [a; s] = [Sy + k a0; Sxy + k m s0]
        m11 = fit.weight + k
        m12 = fit.sum_x
        m22 = fit.sum_xx + k_scale
        r1 = fit.sum_y + k * a0
        r2 = fit.sum_xy + k_scale * s0
        determinant = m11 * m22 - m12 * m12
        if determinant <= 0:
            return fit.overhead_s, fit.time_scale
        overhead = (r1 * m22 - m12 * r2) / determinant
        scale = (m11 * r2 - m12 * r1) / determinant
        if not 0.0 <= overhead <= MAX_OVERHEAD_S:
            # Refit the scale alone with the overhead pinned at its bound.
            overhead = min(MAX_OVERHEAD_S, max(0.0, overhead))
            scale = (r2 - m12 * overhead) / m22
        return overhead, min(MAX_SCALE, max(MIN_SCALE, scale))

    def forget(self, endpoint_id: str) -> None:
        """An endpoint left the pool; what it taught the pool fit stays."""
        self._fits.pop(endpoint_id, None)
        self.models.pop(endpoint_id, None)

    # -- what it reports ----------------------------------------------------------------------

    def error_ratio(self, endpoint_id: str | None = None) -> float | None:
        """Median absolute percentage error (as a ratio) of the last predictions, of one
        endpoint or (None) the pool; None before any first token."""
        fit = self._pool if endpoint_id is None else self._fits.get(endpoint_id)
        if fit is None or not fit.errors:
            return None
        return statistics.median(fit.errors)

    def fitted(self) -> dict[str, tuple[float, float, int]]:
        """Endpoint -> (overhead_s, time_scale, observations); "" is the pool's fit."""
        fits = {"": self._pool, **self._fits}
        return {
            endpoint_id: (fit.overhead_s, fit.time_scale, fit.observations)
            for endpoint_id, fit in fits.items()
        }


class _FittedModels(dict[str, CostModel]):
    """Endpoint -> fitted model, answering `get` with the pool's model for the others."""

    def __init__(self, *, pool: CostModel) -> None:
        super().__init__()
        self.pool = pool

    def get(self, endpoint_id: str, default: object = None) -> CostModel:
        # `default` is ignored on purpose: an endpoint without a fit of its own is predicted
        # with the pool's fit, never with whatever model the caller had at hand.
        return dict.get(self, endpoint_id, self.pool)

from __future__ import annotations

import random

import pytest

from twinroute.simulator.instance import Instance, InstanceConfig, SimRequest, StepResult
from twinroute.simulator.kvcache import PrefixCache
from twinroute.simulator.profiles import INSTANCE_PROFILES
from twinroute.simulator.sim_cost import cost_model_for

BLOCK = 512
COST = cost_model_for(INSTANCE_PROFILES["llama3-8b-h100"])


def _request(name: str, tokens: int, *, out: int = 1, first_block: int = 0) -> SimRequest:
    blocks = -(-tokens // BLOCK)
    return SimRequest(
        request_id=name,
        prompt_tokens=tokens,
        output_tokens=out,
        block_ids=list(range(first_block, first_block + blocks)),
    )


def _instance(*, capacity: int = 400_000, budget: int = 8192, max_seqs: int = 256) -> Instance:
    config = InstanceConfig(
        kv_capacity_tokens=capacity,
        block_size=BLOCK,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
    )
    return Instance(config=config, cost=COST)


def _run(instance: Instance, *, now: float = 0.0) -> tuple[float, dict[str, float], list[str]]:
    """Step until idle; returns the end time, first-token times and finish order."""
    first: dict[str, float] = {}
    finished: list[str] = []
    while instance.busy:
        result = instance.step(now)
        now += result.duration_s
        for token in result.first_tokens:
            first[token.request_id] = now
        finished.extend(f.request_id for f in result.finished)
    return now, first, finished


@pytest.mark.parametrize(
    ("tokens", "chunks"),
    [(3000, [(3000, 0)]), (20_000, [(8192, 0), (8192, 8192), (3616, 16_384)])],
    ids=["one-step", "chunked"],
)
def test_lone_request_ttft_equals_cost_model(tokens: int, chunks: list[tuple[int, int]]) -> None:
    instance = _instance()
    instance.submit(_request("a", tokens))
    _, first, finished = _run(instance)
    expected = sum(COST.prefill_time_s(uncached_tokens=n, cached_tokens=ctx) for n, ctx in chunks)
    assert first["a"] == pytest.approx(expected)
    assert finished == ["a"]


def test_repeated_prompt_hits_the_cache() -> None:
    instance = _instance()
    instance.submit(_request("a", 4000))
    cold_end, first, _ = _run(instance)
    instance.submit(_request("b", 4000))
    result = instance.step(cold_end)
    assert [t.cached_tokens for t in result.first_tokens] == [3999]
    assert result.duration_s == pytest.approx(
        COST.prefill_time_s(uncached_tokens=1, cached_tokens=3999)
    )
    assert result.duration_s < first["a"] / 10
    metrics = instance.metrics()
    assert metrics.prefix_cache_queries == 8000
    assert metrics.prefix_cache_hits == 3999


def test_shared_prefix_hits_only_the_shared_blocks() -> None:
    instance = _instance()
    instance.submit(_request("a", 2048))
    end, _, _ = _run(instance)
    other = SimRequest(
        request_id="b", prompt_tokens=2048, output_tokens=1, block_ids=[0, 1, 100, 101]
    )
    instance.submit(other)
    result = instance.step(end)
    assert [t.cached_tokens for t in result.first_tokens] == [1024]


def test_eviction_under_pressure_drops_the_least_recent_tail_first() -> None:
    instance = _instance(capacity=4096)
    instance.submit(_request("a", 2048))
    end, _, _ = _run(instance)
    assert instance.cache.cached_blocks == 4
    # 3072 new tokens fit only by evicting two of a's four blocks: its tail goes first.
    instance.submit(_request("b", 3072, first_block=100))
    end, _, _ = _run(instance, now=end)
    assert instance.cache.contains(0) and instance.cache.contains(1)
    assert not instance.cache.contains(2) and not instance.cache.contains(3)
    instance.submit(_request("a-again", 2048))
    result = instance.step(end)
    assert [t.cached_tokens for t in result.first_tokens] == [1024]
    assert instance.metrics().evicted_blocks >= 2


def test_referenced_blocks_are_never_evicted() -> None:
    cache = PrefixCache(capacity_tokens=1024)
    assert cache.reserve(512)
    cache.commit(7, 512)
    assert not cache.reserve(1024), "block 7 is referenced and must stay"
    cache.release([7])
    assert cache.reserve(1024)
    assert not cache.contains(7)


def test_requests_batch_into_one_step_within_the_token_budget() -> None:
    instance = _instance()
    instance.submit(_request("a", 3000, out=3))
    instance.submit(_request("b", 3000, out=3, first_block=100))
    result = instance.step(0.0)
    assert sorted(t.request_id for t in result.first_tokens) == ["a", "b"]
    # One forward pass: the fixed per-pass cost is paid once for both chunks.
    assert result.duration_s == pytest.approx(
        2 * COST.prefill_time_s(uncached_tokens=3000, cached_tokens=0)
        - COST.prefill_time_s(uncached_tokens=0, cached_tokens=0)
    )
    decode = instance.step(result.duration_s)
    assert decode.duration_s == pytest.approx(
        COST.decode_step_time_s(batch_size=2, kv_tokens=2 * 3001)
    )


def test_budget_splits_prefill_and_decodes_ride_along() -> None:
    instance = _instance(budget=1000)
    instance.submit(_request("a", 500, out=10))
    first = instance.step(0.0)
    assert [t.request_id for t in first.first_tokens] == ["a"]
    instance.submit(_request("b", 2500, first_block=100))
    steps = [instance.step(0.0) for _ in range(3)]
    # a decodes one token per step; b gets the other 999 tokens of each step's budget.
    assert [s.first_tokens for s in steps[:2]] == [(), ()]
    assert [t.request_id for t in steps[2].first_tokens] == ["b"]
    assert steps[0].duration_s == pytest.approx(
        COST.prefill_time_s(uncached_tokens=999, cached_tokens=0)
        + COST.decode_step_time_s(batch_size=1, kv_tokens=501)
    )


def test_max_num_seqs_limits_admission() -> None:
    instance = _instance(max_seqs=2)
    for k in range(3):
        instance.submit(_request(f"r{k}", 100, out=5, first_block=100 * k))
    result = instance.step(0.0)
    assert len(result.first_tokens) == 2
    assert instance.scrape()[:2] == (2, 1)


def test_preemption_under_memory_pressure_still_completes_everything() -> None:
    instance = _instance(capacity=3 * 1024)
    for k in range(3):
        instance.submit(_request(f"r{k}", 1000, out=400, first_block=10 * k))
    _, first, finished = _run(instance)
    assert sorted(finished) == ["r0", "r1", "r2"]
    assert set(first) == {"r0", "r1", "r2"}
    assert instance.metrics().preemptions > 0


def test_withdraw_takes_back_only_requests_not_yet_admitted() -> None:
    instance = _instance(max_seqs=1)
    instance.submit(_request("a", 100, out=5))
    instance.submit(_request("b", 100, out=5, first_block=10))
    instance.step(0.0)
    assert not instance.withdraw("a")
    assert instance.withdraw("b")
    assert instance.scrape()[:2] == (1, 0)


def _drive(
    instance: Instance, arrivals: list[tuple[float, SimRequest]], *, runs: bool
) -> list[tuple[str, str, float]]:
    """Feed timed arrivals; with `runs`, jump over pure decode stretches like the simulator."""
    events: list[tuple[str, str, float]] = []
    pending = list(arrivals)
    now = 0.0
    while pending or instance.busy:
        while pending and pending[0][0] <= now:
            instance.submit(pending.pop(0)[1])
        if not instance.busy:
            now = pending[0][0]
            continue
        run = instance.plan_decode_run() if runs else None
        result: StepResult
        if run is not None:
            steps = run.steps
            if pending:
                # Cut at the first step boundary at or after the next arrival.
                offset = pending[0][0] - now
                steps = min(steps, 1 + sum(1 for e in run.ends_s[:-1] if e < offset))
            result = instance.apply_decode_run(run, steps=steps)
        else:
            result = instance.step(now)
        now += result.duration_s
        events += [("first", t.request_id, round(now, 9)) for t in result.first_tokens]
        events += [("done", f.request_id, round(now, 9)) for f in result.finished]
    return events


@pytest.mark.parametrize("seed", [1, 2, 3], ids=["seed1", "seed2", "seed3"])
def test_decode_runs_match_step_by_step(seed: int) -> None:
    rng = random.Random(seed)
    clock = 0.0
    arrivals = []
    for k in range(40):
        clock += rng.expovariate(2.0)
        tokens = rng.randint(100, 12_000)
        shared = rng.randint(0, 3)
        request = SimRequest(
            request_id=f"r{k}",
            prompt_tokens=tokens,
            output_tokens=rng.randint(1, 300),
            block_ids=[shared, *range(1000 * (k + 1), 1000 * (k + 1) + tokens // BLOCK)],
        )
        arrivals.append((clock, request))
    stepwise = _drive(_instance(capacity=60_000), arrivals, runs=False)
    jumped = _drive(_instance(capacity=60_000), arrivals, runs=True)
    assert jumped == stepwise
    assert len([e for e in stepwise if e[0] == "done"]) == 40

from __future__ import annotations

import pytest
from twinroute.scheduler.costmodel import COST_PROFILES, DEFAULT_COST_PROFILE, LLAMA3_8B_H100
from twinroute.scheduler.types import LoadSnapshot

MODEL = LLAMA3_8B_H100


def test_cached_tokens_make_prefill_cheaper() -> None:
    cold = MODEL.prefill_time_s(uncached_tokens=16_000, cached_tokens=0)
    warm = MODEL.prefill_time_s(uncached_tokens=1_000, cached_tokens=15_000)
    assert warm < cold / 5


def test_prefill_per_token_slows_with_context() -> None:
    short = MODEL.prefill_time_s(uncached_tokens=1_000, cached_tokens=0)
    long = MODEL.prefill_time_s(uncached_tokens=1_000, cached_tokens=60_000)
    assert long > short * 1.5


def test_a_16k_prompt_prefills_in_about_a_second_on_an_h100() -> None:
    assert 0.7 < MODEL.prefill_time_s(uncached_tokens=16_000, cached_tokens=0) < 1.3


def test_decode_step_grows_with_batch_and_kv() -> None:
    one = MODEL.decode_step_time_s(batch_size=1, kv_tokens=1_000)
    many = MODEL.decode_step_time_s(batch_size=64, kv_tokens=64_000)
    assert 0.005 < one < many < 0.05
    assert MODEL.decode_step_time_s(batch_size=0, kv_tokens=0) == 0.0


@pytest.mark.parametrize(
    ("load", "at_least_s"),
    [
        (LoadSnapshot(), 0.0),
        (LoadSnapshot(pending_prefill_tokens=40_000), 2.0),
        (LoadSnapshot(pending_prefill_tokens=40_000, decoding=4096), 4.0),
        (LoadSnapshot(pending_prefill_tokens=40_000, running=4096), 4.0),
    ],
    ids=["idle", "queued-prefill", "queued-and-decoding", "scraped-running"],
)
def test_ttft_estimate_adds_queueing_to_prefill(load: LoadSnapshot, at_least_s: float) -> None:
    alone = MODEL.prefill_time_s(uncached_tokens=4_000, cached_tokens=0)
    estimate = MODEL.estimate_ttft_s(uncached_tokens=4_000, cached_tokens=0, load=load)
    assert estimate >= alone + at_least_s


def test_slo_budget_matches_the_prefill_rate() -> None:
    assert MODEL.slo_prefill_budget_tokens(5.0) == 100_000


def test_profiles_are_registered_by_name() -> None:
    assert DEFAULT_COST_PROFILE in COST_PROFILES
    assert all(name == model.name for name, model in COST_PROFILES.items())

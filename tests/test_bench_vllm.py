"""`twinroute bench vllm`'s parts that need no vLLM: the workload per rate, prompts cut to the
model's context, the merged-cache bound on a case worked out by hand, the router CPU reading
from /proc, and the summary, table and plot from canned numbers.

The real run (vLLM engines, routers) is `e2e/test_bench_vllm.py`.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from twinroute.bench.command import BENCHES
from twinroute.bench.live import Replay, Workload, _default_trace, load_workload
from twinroute.bench.vllm_live import (
    KV_EVENTS_FLAG,
    ForeignLoad,
    add_arguments,
    block_keys,
    engine_cores,
    fit_prompts,
    histogram_median,
    merged_cache_hit_rate,
    parse_rates,
    parse_scheduler_figures,
    plot_rate,
    prediction_errors_after_warmup,
    process_tree_cpu_s,
    rate_table,
    rate_window,
    relative_error_buckets,
    router_summary,
    scheduler_note,
    twinroute_kv_events_args,
)


@pytest.fixture(scope="module")
def trace_workload() -> Workload:
    return load_workload(
        trace=_default_trace(), duration_s=math.inf, speedup=1.0, block_words=1, max_output=8
    )


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A real (in-memory) word-level tokenizer: one token per whitespace-separated word."""
    vocab = {word: i for i, word in enumerate(["[UNK]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def test_bench_is_registered_and_its_defaults_parse() -> None:
    assert BENCHES["vllm"][0] == "twinroute.bench.vllm_live"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.engines == 4 and args.routers.startswith("twinroute_dualmap")
    assert parse_rates("6,12") == [6.0, 12.0]
    with pytest.raises(ValueError):
        parse_rates("0")


@pytest.mark.parametrize("window", ["end", "start"])
def test_rate_window_takes_rate_times_duration_requests_at_that_mean_rate(
    trace_workload: Workload, window: str
) -> None:
    replayed = rate_window(trace_workload, rate=4.0, duration_s=30.0, window=window)
    assert len(replayed) == 120
    assert replayed.arrival_s[0] == 0.0
    assert np.all(np.diff(replayed.arrival_s) >= 0)
    # 119 gaps with a mean of 1/4 s: the last request comes at 29.75 s.
    assert replayed.arrival_s[-1] == pytest.approx(119 / 4.0)
    first = len(trace_workload) - 120 if window == "end" else 0
    for i in (0, 57, 119):
        assert replayed.prompt(i) == trace_workload.prompt(first + i)


def test_the_end_of_the_bundled_trace_shares_more_prefixes_than_its_start(
    trace_workload: Workload,
) -> None:
    """Why `--trace-window end` is the default: block ids seen before, as a share of all."""

    def reused(replayed: Workload) -> float:
        seen: set[int] = set()
        hits = total = 0
        for i in range(len(replayed)):
            ids = replayed.block_ids[replayed.block_offsets[i] : replayed.block_offsets[i + 1]]
            total += len(ids)
            hits += sum(int(b) in seen for b in ids)
            seen.update(int(b) for b in ids)
        return hits / total

    start = rate_window(trace_workload, rate=4.0, duration_s=60.0, window="start")
    end = rate_window(trace_workload, rate=4.0, duration_s=60.0, window="end")
    assert reused(end) > 0.4 > 0.15 > reused(start)


def test_fit_prompts_cuts_only_what_is_too_long_by_whole_words(trace_workload: Workload) -> None:
    replayed = rate_window(trace_workload, rate=2.0, duration_s=20.0, window="end")
    words = {w for i in range(len(replayed)) for w in replayed.prompt(i).split()}
    tokenizer = word_tokenizer(sorted(words))
    longest = int(replayed.prompt_words.max())
    limit = longest - 3
    fitted, token_ids, cut = fit_prompts(replayed, tokenizer=tokenizer, max_tokens=limit)
    assert cut == int((replayed.prompt_words > limit).sum()) >= 1
    for i in range(len(fitted)):
        assert len(token_ids[i]) == min(int(replayed.prompt_words[i]), limit)
        assert replayed.prompt(i).startswith(fitted.prompt(i))
        assert token_ids[i] == tokenizer.encode(fitted.prompt(i)).ids
    assert np.array_equal(replayed.prompt_words, trace_workload.prompt_words[-40:])


def test_block_keys_name_a_block_with_its_whole_prefix() -> None:
    assert block_keys([1, 2, 3, 4, 5], block_tokens=2) == block_keys([1, 2, 3, 4], block_tokens=2)
    first = block_keys([1, 2, 3, 4], block_tokens=2)
    other = block_keys([9, 9, 3, 4], block_tokens=2)
    assert len(first) == 2 and first[1] != other[1]
    assert block_keys([1], block_tokens=2) == []


def test_merged_cache_bound_on_a_hand_checked_sequence() -> None:
    """Blocks of 2 tokens, room for 2 blocks.

    1. [1 2 3 4 5]: cold, 5 queried, 0 hit; stores (12), (12|34).
    2. [1 2 3 4 9]: both blocks hit (4 tokens; the last token is never a hit); touched tail
       first, so (12) is the most recent and (12|34) the least.
    3. [7 8 9]: misses; storing (78) evicts (12|34).
    4. [1 2 3 4 0]: (12) hits, (12|34) was evicted: 2 tokens.
    5. [1 2]: a whole cached block, but the last token must be computed: 0 hits.
    Hits 0 + 4 + 0 + 2 + 0 = 6 of 5 + 5 + 3 + 5 + 2 = 20 tokens.
    """
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 9], [7, 8, 9], [1, 2, 3, 4, 0], [1, 2]]
    assert merged_cache_hit_rate(prompts, capacity_blocks=2, block_tokens=2) == 6 / 20
    # With room for everything, request 4 hits both blocks: 8 of 20.
    assert merged_cache_hit_rate(prompts, capacity_blocks=100, block_tokens=2) == 8 / 20
    assert merged_cache_hit_rate([], capacity_blocks=1) == 0.0


def test_engines_are_pinned_round_robin_over_the_allowed_cores() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    cores = engine_cores(len(allowed) * 2 + 1)
    assert cores[: len(allowed)] == allowed == cores[len(allowed) : 2 * len(allowed)]


def test_router_cpu_counts_the_whole_process_tree() -> None:
    """A parent that only waits, and a child that spins for about 0.3 s: the tree owns it."""
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    wait = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {spin!r}])\n"
        "time.sleep(5)"
    )
    parent = subprocess.Popen([sys.executable, "-c", wait])
    try:
        before = process_tree_cpu_s([parent.pid])
        time.sleep(1.5)
        spent = process_tree_cpu_s([parent.pid]) - before
    finally:
        parent.kill()
        parent.wait()
    assert spent >= 0.2


def test_foreign_load_sees_cpu_spent_outside_this_process_tree() -> None:
    """A spinner detached from this process (its shell parent exits at once, so it belongs to
    no process of ours) shows up as other processes' CPU; our own spinning child does not."""
    foreign = ForeignLoad()
    spin = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"
    subprocess.run(["sh", "-c", f'{sys.executable} -c "{spin}" &'], check=True)
    subprocess.run([sys.executable, "-c", spin], check=True)  # ours: not counted
    time.sleep(0.2)
    cores = len(os.sched_getaffinity(0))
    # The detached 0.6 s over about 1 s of wall time; others on the machine only add to it.
    assert foreign.share() >= 0.4 / (2.0 * cores)


def test_the_engines_kv_event_publishers_reach_twinroutes_router() -> None:
    where = {"address": "tcp://127.0.0.1:5557", "replay_address": "tcp://127.0.0.1:5558"}
    args = twinroute_kv_events_args({"engine-0": where})
    assert args == [
        f"{KV_EVENTS_FLAG}=engine-0=tcp://127.0.0.1:5557",
        "--kv-events-replay-endpoints=engine-0=tcp://127.0.0.1:5558",
    ]
    # The router takes them (embedded scheduler settings).
    from twinroute.router.command import add_arguments, embedded_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args(["--embedded", "--model=m", "--endpoints=engine-0=h:1", *args])
    settings = embedded_settings(parsed)
    assert settings.kv_events_endpoints == (("engine-0", "tcp://127.0.0.1:5557"),)
    assert settings.kv_events_replay_endpoints == (("engine-0", "tcp://127.0.0.1:5558"),)


def canned_counters(finished: list[int], hits: list[int]) -> list[dict[str, float]]:
    return [
        {
            "queries": 1000.0,
            "hits": float(h),
            "ttft_sum": 0.05 * f,
            "ttft_count": float(f),
            "finished": float(f),
            "preemptions": 0.0,
            "kv_transfers": 0.0,
            "kv_transfer_s": 0.0,
            "remote_prefills": 0.0,
        }
        for f, h in zip(finished, hits, strict=True)
    ]


def canned_router(ttft: list[float]) -> dict[str, Any]:
    before = canned_counters([0, 0], [0, 0])
    after = canned_counters([3, 1], [500, 100])
    for row in after:
        row["queries"] += 1000.0
    result = Replay(ttft_s=np.asarray(ttft), errors=int(np.isnan(ttft).sum()), wall_s=2.0)
    return router_summary(result, before=before, after=after, cpu_s=0.008, slo_s=0.5)


def test_summary_table_and_plot_from_canned_numbers(tmp_path: Path) -> None:
    good = canned_router([0.1, 0.2, 0.3, 0.9])
    assert good["prefix_hit_rate"] == pytest.approx(600 / 2000)
    assert (good["load_max"], good["load_mean"]) == (3, 2.0)
    assert good["slo_attainment"] == 0.75
    assert good["router_cpu_ms_per_request"] == pytest.approx(2.0)
    assert good["ttft_p50_s"] == pytest.approx(0.25)
    failing = canned_router([0.1, math.nan, 0.3, 0.2])
    assert failing["errors"] == 1 and failing["slo_attainment"] == 0.75

    rate_result = {"bound_hit_rate": 0.4, "routers": {"a_dualmap": good, "b_rr": failing}}
    table = rate_table(rate_result, slo_s=0.5).splitlines()
    assert table[0].startswith("| router | prefix hit rate | bound | TTFT p50 (s)")
    assert table[2] == (
        "| a_dualmap | 30.0% | 40.0% | 0.250 | 0.720 | 0.882 | 75.0% | 3 / 2.0 | 2.00 | 0 | 0% |"
    )
    assert table[3].endswith("| 1 | 0% |")
    path = plot_rate("4", rate_result, out=tmp_path, slo_s=0.5)
    assert path == tmp_path / "vllm_rate_4.png" and path.stat().st_size > 10_000


def test_the_embedded_schedulers_own_figures_are_read_and_told() -> None:
    text = "\n".join(
        [
            'twinroute_scheduler_ttft_prediction_error_ratio{endpoint=""} 0.21',
            'twinroute_scheduler_ttft_prediction_error_ratio{endpoint="e0"} 0.5',
            'twinroute_scheduler_prefix_lookups_total{source="precise"} 75.0',
            'twinroute_scheduler_prefix_lookups_total{source="approximate"} 25.0',
            'twinroute_scheduler_prefix_record_checks_total{verdict="same"} 8.0',
            'twinroute_scheduler_prefix_record_checks_total{verdict="over"} 2.0',
            "twinroute_scheduler_prefix_record_error_tokens_total 640.0",
            'twinroute_scheduler_decisions_total{policy="dualmap",reason="cache_affinity"} 60.0',
            'twinroute_scheduler_decisions_total{policy="dualmap",reason="tie_less_loaded"} 30.0',
            'twinroute_scheduler_decisions_total{policy="dualmap",reason="slo_switch"} 10.0',
        ]
    )
    figures = parse_scheduler_figures(text)
    assert figures["ttft_prediction_error"] == 0.21
    assert figures["decisions_slo_switch"] == 10.0
    note = scheduler_note("twinroute_dualmap", figures)
    assert "decisions: cache_affinity 60%, tie_less_loaded 30%, slo_switch 10%" in note
    assert "median abs. error 21%" in note
    assert "answered by KV events 75% whole, 0% in part" in note
    assert "agreed with the engine on 80% of picks (over 20%, under 0%; off by 64 tokens" in note


def test_the_prediction_error_after_warmup_is_split_by_what_the_pick_found() -> None:
    """Requests that found their engine idle measure the fit; the others, the queue estimate."""

    def exposition(idle: list[float], busy: list[float]) -> str:
        bounds = ["0.1", "0.25", "0.5", "1.0", "+Inf"]
        name = "twinroute_scheduler_ttft_prediction_relative_error_bucket"
        return "\n".join(
            f'{name}{{engine_at_pick="{at_pick}",le="{bound}",policy="dualmap"}} {count}'
            for at_pick, counts in (("idle", idle), ("busy", busy))
            for bound, count in zip(bounds, counts, strict=True)
        )

    at_warmup = exposition([0, 0, 0, 0, 2], [0, 0, 0, 0, 2])
    # After it: 10 idle, all within 10%; 10 busy, all between 50% and 100% off.
    at_end = exposition([10, 10, 10, 10, 12], [0, 0, 0, 10, 12])
    figures = prediction_errors_after_warmup(at_warmup, at_end)
    assert figures["predictions_after_warmup"] == 20
    assert figures["predictions_after_warmup_idle"] == 10
    assert figures["ttft_prediction_error_after_warmup_idle"] == pytest.approx(0.05)
    assert figures["ttft_prediction_error_after_warmup_busy"] == pytest.approx(0.75)
    assert figures["ttft_prediction_error_after_warmup"] == pytest.approx(0.1)
    note = scheduler_note("twinroute_dualmap", {**figures, "prediction_warmup_s": 60.0})
    assert "10% over the 20 requests after the first 60 s (5% of the 10 that found their " in note
    assert "engine idle, 75% of the 10 that found their engine busy)" in note


def test_the_prediction_error_after_warmup_is_the_median_of_two_scrapes_difference() -> None:
    def exposition(counts: list[float]) -> str:
        bounds = ["0.1", "0.25", "0.5", "1.0", "+Inf"]
        name = "twinroute_scheduler_ttft_prediction_relative_error_bucket"
        return (
            "\n".join(
                f'{name}{{le="{bound}",policy="dualmap"}} {count}'
                for bound, count in zip(bounds, counts, strict=True)
            )
            + '\ntwinroute_scheduler_ttft_prediction_relative_error_count{policy="dualmap"} 9.0\n'
        )

    # The first minute: 4 predictions, all off by more than 100%. After it: 10 more, 8 of
    # them within 25%.
    at_warmup = relative_error_buckets(exposition([0, 0, 0, 0, 4]))
    at_end = relative_error_buckets(exposition([4, 8, 9, 10, 14]))
    assert at_end == {0.1: 4.0, 0.25: 8.0, 0.5: 9.0, 1.0: 10.0, math.inf: 14.0}
    span = {bound: at_end[bound] - at_warmup[bound] for bound in at_end}
    # Rank 5 of 10 lies in (0.1, 0.25], a quarter of the way from 4 to 8.
    assert histogram_median(span) == pytest.approx(0.1 + 0.15 * (5 - 4) / (8 - 4))
    assert histogram_median(at_end) == pytest.approx(0.1 + 0.15 * (7 - 4) / (8 - 4))
    assert histogram_median(at_warmup) == 1.0  # beyond the last bound: the last bound
    assert histogram_median({math.inf: 0.0}) is None

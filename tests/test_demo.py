"""`twinroute demo`: its verdict, its records and its plots."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinroute.bench.live import (
    Workload,
    drop_empty_logs,
    label,
    load_workload,
    plot,
    window_reuse,
)
from twinroute.demo_report import live_verdict
from twinroute.formatting import seconds

REPOSITORY = Path(__file__).resolve().parents[1]


def figures(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "requests": 100,
        "slo_attainment": 0.95,
        "ttft_p50_s": 1.0,
        "ttft_p90_s": 3.0,
        "ttft_p99_s": 5.0,
        "cache_hit_rate": 0.30,
        "max_over_mean_load": 1.15,
        "errors": 0,
        "throughput_rps": 3.0,
        "router_overhead_ms": 8.0,
        "ttft_s": [0.5, 1.0, 3.0, float("nan")],
    }
    return {**base, **overrides}


def document(routers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "command": "twinroute bench live --routers=x",
        "requests": 100,
        "slo_s": 5.0,
        "trace_start_s": 900.0,
        "duration_s": 40.0,
        "reuse_in_window": 0.32,
        "routers": routers,
    }


def test_the_verdict_leads_with_a_kubernetes_service_and_says_where_we_lose() -> None:
    verdict = live_verdict(
        document(
            {
                "twinroute_dualmap": figures(),
                "twinroute_round_robin": figures(
                    slo_attainment=0.52,
                    ttft_p50_s=4.4,
                    ttft_p90_s=10.6,
                    cache_hit_rate=0.107,
                    max_over_mean_load=1.01,
                ),
                # Faster at the median, though no more within the SLO: a loss to admit.
                "sglang_cache_aware": figures(ttft_p50_s=0.8, cache_hit_rate=0.31),
                # Evener than twinroute itself: the Envoy path is ours, never a loss.
                "twinroute_envoy": figures(max_over_mean_load=1.0),
            }
        ),
        simulated_ideal=0.349,
    )
    text = verdict.markdown
    first = text.splitlines()[0]
    assert first.startswith("**Against round robin (a Kubernetes Service): median TTFT 4.4x lower")
    assert "+43.0 points of requests within the SLO" in first
    for name in ("twinroute_dualmap", "twinroute_round_robin", "sglang_cache_aware"):
        assert f"| {label(name)} |" in text
    losses = text.split("Where twinroute did not win here:")[1]
    assert "sglang-router (cache_aware) had the lower median TTFT (800 ms vs 1 s)" in losses
    assert "round robin (a Kubernetes Service) spread requests more evenly" in losses
    assert "twinroute via Envoy" not in losses
    assert "CPU per request" in losses
    assert "32.0% of its prompt tokens repeat an earlier request" in text
    assert "could hit 35%" in text
    comparisons = {c["other"]: c for c in verdict.data["comparisons"]}
    assert comparisons["twinroute_round_robin"]["ttft_p50_ratio"] == pytest.approx(4.4)
    assert comparisons["twinroute_round_robin"]["slo_attainment_points"] == pytest.approx(43.0)
    assert comparisons["sglang_cache_aware"]["where_twinroute_loses"]
    json.dumps(verdict.data)  # what the demo saves must be JSON


def test_a_level_run_is_called_level_and_not_a_win() -> None:
    verdict = live_verdict(
        document(
            {
                "twinroute_dualmap": figures(),
                "vllm_cache_aware": figures(ttft_p50_s=1.05, slo_attainment=0.94),
            }
        )
    )
    assert "the median TTFT was level (1 s vs 1.05 s)" in verdict.markdown
    assert "It found as much cached as twinroute (30% vs 30%); the difference" in verdict.markdown
    assert "nowhere in this run, beyond the noise margin" in verdict.markdown


def test_people_read_seconds_with_three_figures() -> None:
    assert seconds(1.0941970210001273) == "1.09 s"
    assert seconds(0.5273) == "527 ms"
    assert seconds(None) == "-"
    assert seconds(float("nan")) == "-"


def small_workload(blocks: list[list[int]], words: list[int]) -> Workload:
    offsets = np.cumsum([0, *(len(b) for b in blocks)]).astype(np.int64)
    return Workload(
        arrival_s=np.arange(len(blocks), dtype=np.float64),
        prompt_words=np.asarray(words, dtype=np.int64),
        output_tokens=np.ones(len(blocks), dtype=np.int64),
        block_offsets=offsets,
        block_ids=np.asarray([b for row in blocks for b in row], dtype=np.int64),
        block_words=4,
    )


def test_window_reuse_counts_leading_blocks_seen_earlier_in_the_window() -> None:
    # Request 2 repeats request 1's two blocks then diverges; request 3 shares only a later
    # block (no prefix), so it reuses nothing; the last prompt word is always computed.
    workload = small_workload([[1, 2], [1, 2, 3], [9, 2]], [8, 12, 8])
    assert window_reuse(workload) == pytest.approx(8 / 28)
    assert window_reuse(small_workload([[1], [1]], [4, 4])) == pytest.approx(3 / 8)


def test_a_window_later_in_the_trace_starts_there(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    records = [
        {"timestamp": 1000 * t, "input_length": 600, "output_length": 4, "hash_ids": [t, 100 + t]}
        for t in range(10)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    window = load_workload(
        trace=trace, duration_s=3.0, speedup=1.0, block_words=16, max_output=8, start_s=4.0
    )
    assert window.arrival_s.tolist() == [0.0, 1.0, 2.0]
    assert window.block_ids.tolist() == [4, 104, 5, 105, 6, 106]
    assert window.block_offsets.tolist() == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="no request"):
        load_workload(
            trace=trace, duration_s=3.0, speedup=1.0, block_words=16, max_output=8, start_s=60.0
        )


def test_empty_logs_are_dropped(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "engine-0.log").write_text("")
    (logs / "scheduler.log").write_text("started\n")
    drop_empty_logs(logs)
    assert [p.name for p in logs.iterdir()] == ["scheduler.log"]
    (logs / "scheduler.log").unlink()
    drop_empty_logs(logs)
    assert not logs.exists()


def test_every_plot_is_labelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        saved.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    routers = {
        "twinroute_dualmap": figures(),
        "twinroute_round_robin": figures(cache_hit_rate=0.05),
        "sglang_cache_aware": figures(),
    }
    paths = plot(routers, out=tmp_path, slo_s=5.0, reuse_in_window=0.32)
    assert [p.name for p in paths] == ["live_ttft_cdf.png", "live_summary.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    for figure in saved:
        for axis in figure.axes:
            assert axis.get_title(), "every panel has a title"
            assert axis.get_ylabel(), f"{axis.get_title()!r} has no y label"
    cdf, summary = saved
    assert "%" in cdf.axes[0].get_ylabel()
    assert "(s" in cdf.axes[0].get_xlabel()
    titles = [axis.get_title() for axis in summary.axes]
    assert sum("better" in title for title in titles) == len(titles)
    hit_panel = next(axis for axis in summary.axes if "cached" in axis.get_title())
    assert hit_panel.get_ylim()[1] >= 100, "a hit-rate axis must not magnify small gaps"
    bar_colours = {tuple(patch.get_facecolor()) for patch in hit_panel.patches}
    assert len(bar_colours) == len(routers), "one colour per router"
    assert any(text.get_text().endswith("%") for text in hit_panel.texts), "value labels"


@pytest.mark.slow
def test_the_demo_ends_with_why_twinroute_and_saves_what_it_prints(tmp_path: Path) -> None:
    """The demo end to end on a small scale: two policies simulated at one rate, then a short
    live window through twinroute, round robin and Envoy (no peers: no network in tests)."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "twinroute", "demo", "--policies", "dualmap,round_robin",
         "--rates", "6", "--live-seconds", "6", "--peers", "off", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPOSITORY,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last_screen = result.stdout.split("=" * 78)[-1]
    assert "# Why twinroute?" in last_screen
    assert "**Against round robin (a Kubernetes Service):" in last_screen
    assert "Where twinroute did not win here:" in last_screen
    assert "docs/glossary.md" in last_screen
    assert not re.search(r"\d\.\d{6,}", result.stdout), "an unformatted float reached a person"
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for expected in ("summary.md", "summary.json", "simulated.md", "simulated.json",
                     "live.md", "live.json", "live_summary.png", "live_ttft_cdf.png"):  # fmt: skip
        assert expected in names
    assert all((out / name).stat().st_size > 0 for name in names), "no empty files"
    live_md = (out / "live.md").read_text()
    assert live_md.startswith("Command: `twinroute bench live --routers=")
    assert "--trace-start-s=900" in live_md
    simulated_md = (out / "simulated.md").read_text()
    assert simulated_md.startswith("Command: `twinroute demo --live-seconds 0 --rates 6")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["live"]["headline"].startswith("Against round robin")
    assert (out / "summary.md").read_text().strip() in result.stdout


def failed(requests: int = 100) -> dict[str, Any]:
    return figures(
        slo_attainment=0.0, ttft_p50_s=None, ttft_p90_s=None, ttft_p99_s=None,
        cache_hit_rate=None, max_over_mean_load=None, errors=requests, ttft_s=[],
    )  # fmt: skip


def test_a_router_that_answered_nothing_is_said_so_and_wins_nothing() -> None:
    verdict = live_verdict(
        document({"twinroute_dualmap": figures(), "sglang_cache_aware": failed()})
    )
    text = verdict.markdown
    assert "**sglang-router (cache_aware)**: It answered no request in this run" in text
    losses = text.split("Where twinroute did not win here:")[1]
    assert "sglang" not in losses, "a router with no answers beats twinroute at nothing"
    assert "| sglang-router (cache_aware) | 0.0% | - | - | - | - | 100 |" in text

    ours_failed = live_verdict(
        document({"twinroute_dualmap": failed(), "twinroute_round_robin": figures()})
    ).markdown
    assert "twinroute's router answered no request in this run" in ours_failed
    assert "round robin (a Kubernetes Service) failed fewer requests (0 vs 100)" in ours_failed


def test_the_headline_calls_small_ratios_level_and_prints_large_ones_plainly() -> None:
    text = live_verdict(
        document(
            {
                "twinroute_dualmap": figures(ttft_p50_s=0.05, ttft_p90_s=3.0),
                "twinroute_round_robin": figures(ttft_p50_s=6.15, ttft_p90_s=3.1),
            }
        )
    ).markdown
    assert text.startswith("**Against round robin (a Kubernetes Service): median TTFT 123x lower, "
                           "p90 TTFT level,")  # fmt: skip
    assert "e+" not in text


def test_a_kubernetes_service_that_hit_more_is_not_said_to_ignore_the_cache() -> None:
    text = live_verdict(
        document(
            {
                "twinroute_dualmap": figures(cache_hit_rate=0.01),
                "twinroute_round_robin": figures(cache_hit_rate=0.20),
            }
        )
    ).markdown
    assert "ignores the cache" not in text
    assert "It found more prompt tokens cached (20% vs 1% with twinroute)" in text


def test_a_router_that_cannot_start_costs_the_others_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from twinroute.bench import live

    async def run_one(name: str, args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
        if name == "sglang_cache_aware":
            raise OSError("sglang-router did not say it was listening within 60 s")
        return figures(requests=len(workload), ttft_s=[1.0] * len(workload))

    monkeypatch.setattr(live, "run_one", run_one)
    monkeypatch.setattr(live, "ensure_peers", lambda names: None)
    parser = argparse.ArgumentParser()
    live.add_arguments(parser)
    args = parser.parse_args(
        ["--routers=twinroute_dualmap,sglang_cache_aware", "--duration=5", f"--out={tmp_path}"]
    )
    assert live.run(args) == 0
    recorded = json.loads((tmp_path / "live.json").read_text())["routers"]
    assert recorded["twinroute_dualmap"]["errors"] == 0
    lost = recorded["sglang_cache_aware"]
    assert lost["errors"] == lost["requests"] > 0
    assert "did not say it was listening" in lost["error_samples"][0]
    assert lost["max_over_mean_load"] is None and lost["cache_hit_rate"] is None

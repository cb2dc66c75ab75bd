"""`twinroute bench live --pd P:D`: unified vs disaggregated prefill/decode on the same engines.

With `--pd P:D` (P + D = `--engines`), every twinroute router in `--routers` runs twice over
fresh engines: as given (all engines unified), and as `NAME+pd`, where the first P engines are
prefill engines (`engine-sim --kv-role prefill`) and the other D decode engines
(`--kv-role decode`). The `+pd` run uses a `twinroute scheduler` process with an endpoints file
naming each engine's role (the scheduler places prefill and decode, `scheduler/policies/pd.py`)
and the router carries out vLLM's disaggregated protocol (`twinroute.router.disaggregated`).

Added measures (both runs): TPOT (time per output token after the first, per request, from
the client's stream), and the engines' KV transfer counters (transfers pulled by decode
engines, prefills done for a remote decode, and their modelled-and-slept transfer time).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from twinroute.simulator.disaggregation import PdSplit, parse_pd

PD_SUFFIX = "+pd"

__all__ = [
    "PD_SUFFIX",
    "PdSplit",
    "engine_roles",
    "parse_pd",
    "pd_table",
    "plot_pd",
    "write_endpoints",
]


def engine_roles(split: PdSplit | None) -> list[str]:
    """Each engine's role, in engine order: prefill first, then decode ('unified' without)."""
    if split is None:
        return []
    return ["prefill"] * split.prefill + ["decode"] * split.decode


def role_flags(role: str) -> list[str]:
    return [] if role == "unified" else [f"--kv-role={role}"]


def write_endpoints(path: Path, *, urls: Sequence[str], roles: Sequence[str], model: str) -> Path:
    """The scheduler's `--endpoints-file`: each engine with its role."""
    endpoints = [
        {"id": f"engine-{i}", "address": url.removeprefix("http://"), "role": role, "model": model}
        for i, (url, role) in enumerate(zip(urls, roles, strict=True))
    ]
    path.write_text(yaml.safe_dump({"endpoints": endpoints}, sort_keys=False))
    return path


def pd_table(results: dict[str, dict[str, Any]]) -> str:
    """TTFT, TPOT, throughput and KV transfers per run, side by side."""

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| run | TTFT p50 (s) | TTFT p90 (s) | TPOT p50 (ms) | TPOT p90 (ms) | throughput (req/s) "
        "| KV transfers | remote prefills | mean transfer (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        transfers = r.get("kv_transfers", 0.0)
        mean_transfer = r["kv_transfer_s"] / transfers * 1000 if transfers else None
        tpot50, tpot90 = r.get("tpot_p50_s"), r.get("tpot_p90_s")
        lines.append(
            f"| {name} | {fmt(r['ttft_p50_s'], '.3f')} | {fmt(r['ttft_p90_s'], '.3f')} "
            f"| {fmt(tpot50 * 1000 if tpot50 is not None else None, '.1f')} "
            f"| {fmt(tpot90 * 1000 if tpot90 is not None else None, '.1f')} "
            f"| {r['throughput_rps']:.2f} | {transfers:.0f} | {r.get('remote_prefills', 0.0):.0f} "
            f"| {fmt(mean_transfer, '.1f')} | {r['errors']} |"
        )
    return "\n".join(lines)


def plot_pd(results: dict[str, dict[str, Any]], *, out: Path, split: str) -> Path:
    """`live_pd.png`: TTFT and TPOT CDFs of every run, unified and `+pd`, side by side."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        style = "-" if name.endswith(PD_SUFFIX) else "--"
        for axis, values in ((axes[0], r["ttft_s"]), (axes[1], r.get("tpot_s", []))):
            data = np.sort(np.asarray([x for x in values if not math.isnan(x)]))
            if len(data):
                axis.plot(data, np.arange(1, len(data) + 1) / len(data), style, label=name)
    axes[0].set_xlabel("TTFT (s), client side")
    axes[1].set_xlabel("TPOT (s per token after the first), client side")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_ylabel("share of requests")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Live: unified vs disaggregated ({split} prefill:decode), same engines")
    figure.tight_layout()
    path = out / "live_pd.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

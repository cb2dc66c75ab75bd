"""PNG plots of the goodput benchmark (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def plot_goodput(
    results: dict[str, Any], *, samples: dict[str, dict[str, list[Any]]], out: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    policies: dict[str, dict[str, Any]] = results["policies"]
    title = f"{Path(str(results['trace'])).name}, {results['instances']} instances"
    slo = float(results["ttft_slo_s"])

    # SLO attainment against the request rate: every evaluated point, mean over seeds.
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, row in policies.items():
        by_rate: dict[float, list[float]] = defaultdict(list)
        for rate, _seed, attained in row["curve"]:
            by_rate[float(rate)].append(float(attained))
        rates = sorted(by_rate)
        axes.plot(
            rates,
            [100 * float(np.mean(by_rate[r])) for r in rates],
            marker="o",
            markersize=3,
            linewidth=2.2 if name == "dualmap" else 1.2,
            label=f"{name} ({row['goodput_rps']:.2f} req/s)",
        )
    axes.axhline(100 * float(results["slo_target"]), color="grey", linestyle="--", linewidth=1)
    axes.set_xscale("log")
    axes.set_xlabel("request rate (req/s, log)")
    axes.set_ylabel(f"requests with TTFT <= {slo:g} s (%)")
    axes.set_ylim(0, 101)
    axes.set_title(f"SLO attainment vs rate: {title}")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    written.append(_save(figure, out / "slo_vs_rate.png"))
    plt.close(figure)

    if samples:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for name, kept in samples.items():
            ttft = np.sort(np.asarray(kept["ttft_s"], dtype=np.float64))
            ttft = ttft[np.isfinite(ttft)]
            if ttft.size == 0:
                continue
            shares = np.arange(1, ttft.size + 1) / ttft.size
            axes.plot(
                np.maximum(ttft, 1e-3),
                100 * shares,
                linewidth=2.2 if name == "dualmap" else 1.2,
                label=name,
            )
        axes.axvline(slo, color="grey", linestyle="--", linewidth=1)
        axes.set_xscale("log")
        axes.set_xlabel("TTFT (s, log)")
        axes.set_ylabel("requests (%)")
        axes.set_title(f"TTFT CDF at {results['reference_rate_rps']:g} req/s: {title}")
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
        written.append(_save(figure, out / "ttft_cdf.png"))
        plt.close(figure)

        shown = [p for p in ("dualmap", results.get("best_baseline")) if p and p in samples]
        if shown:
            figure, grid = plt.subplots(
                len(shown), 1, figsize=(8, 2.8 * len(shown)), sharex=True, squeeze=False
            )
            for axes, name in zip(grid[:, 0], shown, strict=True):
                times = np.asarray(samples[name]["load_times_s"], dtype=np.float64)
                load = np.asarray(samples[name]["load"], dtype=np.float64)
                if load.ndim == 2 and load.shape[1] <= 16:
                    for column in range(load.shape[1]):
                        axes.plot(times, load[:, column], linewidth=0.6)
                elif load.ndim == 2:
                    for q, style in ((50, "-"), (90, "--"), (100, ":")):
                        axes.plot(
                            times,
                            np.percentile(load, q, axis=1),
                            linestyle=style,
                            label=f"p{q} instance" if q < 100 else "max instance",
                        )
                    axes.legend(fontsize=7)
                axes.set_ylabel("requests on instance")
                axes.set_title(f"{name}: per-instance load", fontsize=9)
                axes.grid(alpha=0.3)
            grid[-1, 0].set_xlabel("simulated time (s)")
            figure.suptitle(
                f"Load per instance at {results['reference_rate_rps']:g} req/s: {title}",
                fontsize=10,
            )
            written.append(_save(figure, out / "load_over_time.png"))
            plt.close(figure)
    return written


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path

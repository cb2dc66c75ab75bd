"""The router's CPU per request in front of real vLLM engines, beside a bare aiohttp relay.

    .venv/bin/python tools/router_cpu_vllm.py [--requests 600] [--json FILE]

`tools/router_cpu_profile.py` measures the router against an engine simulator; a real vLLM
engine streams each token as it is decoded, so a request costs the relay a read and a write
per token, and that is most of what a router spends on real engines. This starts two real
vLLM CPU engines (the bench's tiny Llama, one core each, KV events on; needs
`.tools/vllm-venv`, see `e2e/`), then, in turn, a bare aiohttp relay (no pick, keys, metrics,
retries or reports: the floor of any aiohttp router), `twinroute router --embedded` without a
tokenizer, with the tokenizer, and with the tokenizer and the engines' KV events, and
`twinroute gateway --embedded` (Envoy relaying, the picker in the scheduler's process; lean
processing) with the tokenizer and KV events, its CPU counted with Envoy's. Each gets
50 warm-up and `--requests` streamed completions (prompts of ~180 words that share one of
eight system prompts, 8 output tokens, 4 at a time); its CPU is read from
/proc/PID/task/*/schedstat of the process and its children (exact, not tick-sampled) before
and after.

To compare revisions in one fleet, give each a `--variant NAME=DIR`, DIR a copy of the
`twinroute` package tree put first on the router's PYTHONPATH (an empty DIR: this tree), and
`--rounds N`: every round runs every mode for every variant, the variants' order alternating
from round to round, and the report gives each variant's runs and their median.
`--profile-dir DIR` runs each router under cProfile (process time) and leaves
DIR/VARIANT-MODE.prof (VARIANT "this" without variants; profiled runs cost more: compare their
shares, not their milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import pathlib
import random
import signal
import statistics
import sys
import time

import aiohttp

from twinroute.bench.live import MODEL
from twinroute.bench.processes import process_tree
from twinroute.bench.vllm_live import BLOCK_TOKENS, Fleet, engine_fleet, twinroute_kv_events_args

REPO = pathlib.Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / ".tools" / "tiny-llama-s0-v2048-h512-l4"
PROFILE_TOOL = REPO / "tools" / "router_cpu_profile.py"
# mode -> what the router runs with
MODES = (
    "bare_aiohttp_relay",
    "characters",
    "tokenizer",
    "tokenizer_kv_events",
    "envoy_tokenizer_kv_events",
)


def cpu_s(root: int) -> dict[str, float]:
    """Seconds on a CPU of every thread of `root` and its live descendants (the kernel
    scheduler's own count, in ns, where /proc's utime and stime are sampled per tick), by
    thread name: the interpreter's threads share the process's name, ZMQ's I/O thread (the KV
    events' transport) is "ZMQbg/IO/0", Envoy's workers have their own."""
    by_name: dict[str, int] = {}
    for pid in process_tree(root):
        for task in glob.glob(f"/proc/{pid}/task/*"):
            with contextlib.suppress(OSError):
                with open(f"{task}/schedstat", encoding="ascii") as handle:
                    used = int(handle.read().split()[0])
                with open(f"{task}/comm", encoding="utf-8") as handle:
                    name = handle.read().strip()
                by_name[name] = by_name.get(name, 0) + used
    return {name: used / 1e9 for name, used in by_name.items()}


async def measure(
    mode: str,
    *,
    fleet: Fleet,
    requests: int,
    port: int,
    python_path: str = "",
    profile: pathlib.Path | None = None,
) -> dict[str, float]:
    endpoints = ",".join(
        f"engine-{i}={url.removeprefix('http://')}" for i, url in enumerate(fleet.urls)
    )
    envoy = mode.startswith("envoy_")
    argv = [
        "gateway" if envoy else "router", f"--port={port}", f"--model={MODEL}", "--embedded",
        f"--endpoints={endpoints}", f"--key-block-tokens={BLOCK_TOKENS}",
        *(["--access-log="] if envoy else []),
    ]  # fmt: skip
    if mode == "bare_aiohttp_relay":
        argv.append("--bare-aiohttp-relay")
    if "tokenizer" in mode:
        argv.append(f"--tokenizer={MODEL_DIR / 'tokenizer.json'}")
    if mode.endswith("kv_events"):
        argv += twinroute_kv_events_args(fleet.kv_events)
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [python_path, env.get("PYTHONPATH")]))
    router = await asyncio.create_subprocess_exec(
        sys.executable, str(PROFILE_TOOL), "--serve", str(profile or "-"), *argv,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    systems = [" ".join(rng.choices(words, k=150)) for _ in range(8)]
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/health") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            gate = asyncio.Semaphore(4)

            async def one() -> None:
                prompt = rng.choice(systems) + " " + " ".join(rng.choices(words, k=30))
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True}
                async with gate, session.post(url, json=body) as response:
                    if response.status != 200:
                        raise RuntimeError(f"{mode}: HTTP {response.status}")
                    async for _chunk in response.content.iter_any():
                        pass

            await asyncio.gather(*(one() for _ in range(50)))
            before, started = cpu_s(router.pid), time.monotonic()
            await asyncio.gather(*(one() for _ in range(requests)))
            after, wall = cpu_s(router.pid), time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):  # one that failed to start is gone
            router.send_signal(signal.SIGTERM)
        await asyncio.wait_for(router.wait(), 30)
    by_thread = {name: spent - before.get(name, 0.0) for name, spent in after.items()}
    return {
        "requests": requests,
        "router_cpu_ms_per_request": round(1000 * sum(by_thread.values()) / requests, 3),
        "cpu_ms_per_request_by_thread": {
            name: round(1000 * spent / requests, 3)
            for name, spent in sorted(by_thread.items())
            if spent > 0
        },
        "requests_per_s": round(requests / wall, 1),
    }


async def run(args: argparse.Namespace, modes: list[str]) -> dict[str, object]:
    fleet_args = argparse.Namespace(
        engines=2, kv_tokens_per_engine=4096, max_model_len=2048, max_num_seqs=16,
        startup_timeout_s=300.0, out=args.out,
    )  # fmt: skip
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "engines": 2,
        "prompt_words": 181,
        "output_tokens": 8,
        "concurrency": 4,
    }
    variants: dict[str, str] = dict(v.partition("=")[::2] for v in args.variant) or {"": ""}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {mode: [] for mode in modes} for name in variants
    }
    port = 18790
    async with engine_fleet(fleet_args, model_dir=MODEL_DIR, extra_args=()) as fleet:
        for round_number in range(args.rounds):
            names = list(variants) if round_number % 2 == 0 else list(variants)[::-1]
            for name in names:
                for mode in modes:
                    measured = await measure(
                        mode, fleet=fleet, requests=args.requests, port=port,
                        python_path=variants[name],
                        profile=args.profile_dir / f"{name or 'this'}-{mode}.prof"
                        if args.profile_dir else None,
                    )  # fmt: skip
                    port += 1
                    runs[name][mode].append(measured)
                    label = f"round {round_number + 1} {name} {mode}" if name else mode
                    print(f"{label}: {measured}", flush=True)
    if list(variants) == [""] and args.rounds == 1:
        results.update({mode: found[0] for mode, found in runs[""].items()})
        return results
    results["rounds"] = args.rounds
    results["variants"] = {
        name: {
            mode: {
                "router_cpu_ms_per_request_median": statistics.median(
                    r["router_cpu_ms_per_request"] for r in found
                ),
                "runs": found,
            }
            for mode, found in by_mode.items()
        }
        for name, by_mode in runs.items()
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=DIR",
        help="a revision to measure: a copy of the twinroute package tree put first on the "
        "router's PYTHONPATH (DIR empty: this tree); give two or more to compare",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile-dir", type=pathlib.Path, help="cProfile each router here")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/router_cpu_vllm"))
    args = parser.parse_args()
    modes = args.modes.split(",")
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown modes: {', '.join(unknown)}")
    results = asyncio.run(run(args, modes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decision cost: microseconds per routing decision, per policy, at 8 and at 256 endpoints.

What one decision costs here (no gRPC, no network):
- keys: `keys_from_tokens` over the prompt's token ids (token mode, 16-token blocks), given
  as a numpy array; the `keys (list)` line shows the same from a Python list, as a servicer
  that copies a protobuf repeated field would pay;
- pick: keys + `policy.pick(request, view)` over the live `SchedulerCore`'s view: the pure
  decision, as a policy makes it in the scheduler and in the simulator;
- core: keys + `SchedulerCore.pick` (view, policy, lease, prefix-index record, history): the
  whole decision path of the live scheduler minus the transport.
Each prompt goes through both paths, so a policy's own state (rotation, hotness window) sees
every prompt twice; that changes what it picks a little, not what a pick costs.

Workload: 8k-token prompts (`--prompt-tokens`) from `--conversations` conversations that share
a 1024-token system prompt; each conversation has its own 4096-token history and every request
a fresh tail, so cache-aware policies find real prefixes in the index. Before measuring, each
(policy, pool) pair routes `--warmup` requests through its core so rings, hotness trees and
prefix records are in steady state; open leases are capped at 2 per endpoint (the oldest is
completed first), so load differs between endpoints. Time advances 10 ms per request (injected,
never read from the clock). Measurement is interleaved: rounds of `--batch` requests go to each
(policy, pool) pair in turn, so a noisy neighbour on the shared host hits all of them alike.

Prints a table of median and p99 microseconds (`--json` for machine-readable rows, `--plot` for
a PNG). Policies not importable yet are listed as missing, not silently dropped.

Run:  twinroute bench decision-cost --plot benchmarks/decision_cost.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from twinroute.bench import command_line
from twinroute.scheduler.build import build_core
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.keys import DEFAULT_BLOCK_SIZE, keys_from_tokens, namespace_seed
from twinroute.scheduler.policies import POLICY_NAMES, make_policy
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint, RoutingRequest

SYSTEM_PROMPT_TOKENS = 1024
HISTORY_TOKENS = 4096
STEP_S = 0.01
LEASES_PER_ENDPOINT = 2


@dataclass(frozen=True, slots=True)
class CostRow:
    policy: str
    endpoints: int
    decisions: int
    pick_p50_us: float
    pick_p99_us: float
    core_p50_us: float
    core_p99_us: float


@dataclass(slots=True)
class _Workload:
    """Prompts of one conversation mix, drawn reproducibly from a seeded generator."""

    rng: np.random.Generator
    system: npt.NDArray[np.int64]
    histories: list[npt.NDArray[np.int64]]
    tail_tokens: int

    def next_prompt(self) -> npt.NDArray[np.int64]:
        history = self.histories[int(self.rng.integers(len(self.histories)))]
        tail = self.rng.integers(0, 128_000, self.tail_tokens)
        return np.concatenate([self.system, history, tail])


def _workload(*, seed: int, conversations: int, prompt_tokens: int) -> _Workload:
    rng = np.random.default_rng(seed)
    tail = prompt_tokens - SYSTEM_PROMPT_TOKENS - HISTORY_TOKENS
    if tail <= 0:
        raise SystemExit(
            f"--prompt-tokens must exceed {SYSTEM_PROMPT_TOKENS + HISTORY_TOKENS} "
            "(system prompt + history)"
        )
    return _Workload(
        rng=rng,
        system=rng.integers(0, 128_000, SYSTEM_PROMPT_TOKENS),
        histories=[rng.integers(0, 128_000, HISTORY_TOKENS) for _ in range(conversations)],
        tail_tokens=tail,
    )


@dataclass(slots=True)
class _Subject:
    """One (policy, pool size) pair with its own core, clock, open leases and samples."""

    policy: str
    endpoints: int
    core: SchedulerCore
    now: float = 0.0
    issued: int = 0
    open_leases: deque[str] = field(default_factory=deque)
    pick_ns: list[int] = field(default_factory=list)
    core_ns: list[int] = field(default_factory=list)

    def _request(self, keys_tokens: npt.NDArray[np.int64], seed: int) -> RoutingRequest:
        self.issued += 1
        return RoutingRequest(
            request_id=f"{self.policy}-{self.endpoints}-{self.issued}",
            keys=keys_from_tokens(keys_tokens, block_size=DEFAULT_BLOCK_SIZE, seed=seed),
            prompt_tokens=int(keys_tokens.shape[0]),
            expected_output_tokens=256,
        )

    def decide(self, prompt: npt.NDArray[np.int64], *, seed: int, measure: bool) -> None:
        self.now += STEP_S
        # The pure decision: keys + policy over the core's view; nothing is recorded.
        started = time.perf_counter_ns()
        request = self._request(prompt, seed)
        self.core.policy.pick(request, self.core.view(now=self.now))
        pick_ns = time.perf_counter_ns() - started
        # The live path: keys + SchedulerCore.pick, which opens a lease and records the prompt.
        started = time.perf_counter_ns()
        request = self._request(prompt, seed)
        result = self.core.pick(request, now=self.now)
        core_ns = time.perf_counter_ns() - started
        if measure:
            self.pick_ns.append(pick_ns)
            self.core_ns.append(core_ns)
        self.open_leases.append(result.lease_id)
        while len(self.open_leases) > LEASES_PER_ENDPOINT * self.endpoints:
            self.core.complete(self.open_leases.popleft(), now=self.now, output_tokens=256)


def _subject(policy: str, endpoints: int) -> _Subject:
    # The live scheduler's core as `twinroute scheduler` builds it (its default settings).
    core = build_core(SchedulerSettings(policy=policy))
    core.set_endpoints(
        Endpoint(id=f"vllm-{i:03d}", address=f"127.0.0.1:{8000 + i}") for i in range(endpoints)
    )
    return _Subject(policy=policy, endpoints=endpoints, core=core)


def _available_policies(names: list[str]) -> tuple[list[str], dict[str, str]]:
    available, missing = [], {}
    for name in names:
        try:
            make_policy(name)
        except (ImportError, AttributeError) as error:
            missing[name] = f"{type(error).__name__}: {error}"
        else:
            available.append(name)
    return available, missing


def _percentiles_us(samples_ns: list[int]) -> tuple[float, float]:
    values = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return float(np.median(values)), float(np.quantile(values, 0.99))


def _time_keys(
    make: Callable[[npt.NDArray[np.int64] | list[int]], object],
    prompts: list[npt.NDArray[np.int64]] | list[list[int]],
    *,
    repeats: int,
) -> tuple[float, float]:
    """Keys over distinct prompts in turn, so each call reads a prompt that is not hot in the
    CPU cache, as a new request's would not be."""
    samples = []
    for index in range(repeats):
        prompt = prompts[index % len(prompts)]
        started = time.perf_counter_ns()
        make(prompt)
        samples.append(time.perf_counter_ns() - started)
    return _percentiles_us(samples)


def _plot(rows: list[CostRow], path: str, *, prompt_tokens: int, keys_p50_us: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(row.policy for row in rows))
    pools = sorted({row.endpoints for row in rows})
    figure, axes = plt.subplots(1, len(pools), figsize=(5.5 * len(pools), 4.2), squeeze=False)
    for axis, pool in zip(axes[0], pools, strict=True):
        by_policy = {row.policy: row for row in rows if row.endpoints == pool}
        x = np.arange(len(policies))
        axis.bar(x - 0.2, [by_policy[p].pick_p50_us for p in policies], 0.4, label="pick p50")
        axis.bar(x + 0.2, [by_policy[p].core_p50_us for p in policies], 0.4, label="core p50")
        axis.axhline(keys_p50_us, color="black", linestyle=":", label="keys alone p50")
        axis.set_xticks(x, policies, rotation=35, ha="right")
        axis.set_ylabel("microseconds per decision")
        axis.set_title(f"{pool} endpoints, {prompt_tokens}-token prompts")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies", default=",".join(POLICY_NAMES),
        help="policies to measure, comma-separated; the default is every one there is",
    )  # fmt: skip
    parser.add_argument("--endpoints", default="8,256", help="pool sizes, comma-separated")
    parser.add_argument(
        "--prompt-tokens", type=int, default=8192,
        help=f"tokens per prompt: a {SYSTEM_PROMPT_TOKENS}-token shared system prompt, a "
        f"{HISTORY_TOKENS}-token history, then a fresh tail (more than "
        f"{SYSTEM_PROMPT_TOKENS + HISTORY_TOKENS} in all)",
    )  # fmt: skip
    parser.add_argument(
        "--conversations", type=int, default=64,
        help="conversations, each with its own history; a request continues one at random",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=int, default=300,
        help="unmeasured decisions per (policy, pool size) pair first",
    )  # fmt: skip
    parser.add_argument(
        "--decisions", type=int, default=400, help="measured decisions per (policy, pool size)"
    )
    parser.add_argument(
        "--batch", type=int, default=20, help="decisions per pair in each interleaved round"
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the prompts (token ids, conversation picked)"
    )
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines too")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart to this PNG")


def run(args: argparse.Namespace) -> int:
    requested = [name for name in args.policies.split(",") if name]
    unknown = sorted(set(requested) - set(POLICY_NAMES))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}")
    pools = [int(n) for n in args.endpoints.split(",") if n]
    if not pools or min(pools) < 1:
        raise ValueError("--endpoints needs positive pool sizes")
    policies, missing = _available_policies(requested)
    print("# " + command_line())
    for name, why in missing.items():
        print(f"# policy {name} is missing here ({why}); not measured")

    seed = namespace_seed(model="meta-llama/Llama-3.1-8B-Instruct")
    workload = _workload(
        seed=args.seed, conversations=args.conversations, prompt_tokens=args.prompt_tokens
    )
    subjects = [_subject(policy, pool) for pool in pools for policy in policies]
    started = time.perf_counter()
    for subject in subjects:
        for _ in range(args.warmup):
            subject.decide(workload.next_prompt(), seed=seed, measure=False)
    print(f"# warm-up done in {time.perf_counter() - started:.1f} s", flush=True)
    rounds = -(-args.decisions // args.batch)
    for round_index in range(rounds):
        # Prompts are drawn before timing; every pair sees the same prompts in a round.
        prompts = [workload.next_prompt() for _ in range(args.batch)]
        for subject in subjects:
            for prompt in prompts:
                subject.decide(prompt, seed=seed, measure=True)
        if (round_index + 1) % max(1, rounds // 5) == 0:
            print(f"# round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)

    # Keys alone, after the rounds (a warm process), over 256 distinct prompts.
    samples = [workload.next_prompt() for _ in range(256)]
    keys_np = _time_keys(
        lambda tokens: keys_from_tokens(tokens, block_size=DEFAULT_BLOCK_SIZE, seed=seed),
        samples,
        repeats=2000,
    )
    keys_list = _time_keys(
        lambda tokens: keys_from_tokens(tokens, block_size=DEFAULT_BLOCK_SIZE, seed=seed),
        [sample.tolist() for sample in samples[:64]],
        repeats=500,
    )

    rows = []
    for subject in subjects:
        pick_p50, pick_p99 = _percentiles_us(subject.pick_ns)
        core_p50, core_p99 = _percentiles_us(subject.core_ns)
        rows.append(
            CostRow(
                policy=subject.policy,
                endpoints=subject.endpoints,
                decisions=len(subject.pick_ns),
                pick_p50_us=pick_p50,
                pick_p99_us=pick_p99,
                core_p50_us=core_p50,
                core_p99_us=core_p99,
            )
        )

    blocks = args.prompt_tokens // DEFAULT_BLOCK_SIZE
    print(
        f"# {args.prompt_tokens}-token prompts, {blocks} blocks of {DEFAULT_BLOCK_SIZE}; "
        f"microseconds per decision (median / p99), {args.decisions} decisions per row"
    )
    print(f"keys (numpy array)   p50 {keys_np[0]:8.1f}   p99 {keys_np[1]:8.1f}")
    print(f"keys (Python list)   p50 {keys_list[0]:8.1f}   p99 {keys_list[1]:8.1f}")
    print(
        f"{'policy':<16} {'N':>4} {'pick p50':>9} {'pick p99':>9} {'core p50':>9} {'core p99':>9}"
    )
    for row in rows:
        print(
            f"{row.policy:<16} {row.endpoints:>4} {row.pick_p50_us:>9.1f} {row.pick_p99_us:>9.1f}"
            f" {row.core_p50_us:>9.1f} {row.core_p99_us:>9.1f}"
        )
    if args.json:
        print(json.dumps({"keys_numpy_us": keys_np, "keys_list_us": keys_list}))
        for row in rows:
            print(json.dumps(asdict(row)))
    if args.plot:
        _plot(rows, args.plot, prompt_tokens=args.prompt_tokens, keys_p50_us=keys_np[0])
        print(f"wrote {args.plot}")
    return 0

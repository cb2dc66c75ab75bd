"""CPU per KV-event message of the scheduler's subscriber, versions side by side in one run.

A publisher process sends real vLLM KV-event batches (the recording in
`tests/fixtures/vllm_kv_events_real.jsonl`, cycled, with fresh sequence numbers) over ZMQ PUB
at a fixed rate, spaced so that each message arrives on its own, as on a router whose engines
publish one or two batches per request. This process runs each given version of
`scheduler/kv_subscriber.py` in turn (rounds alternate the order) on the servers' event loop
(uvloop), reads the index as a router's picks do (`--reads-per-s`, one engine read each, the
same timer for every version), and reads its own CPU time (/proc, through
`time.process_time`, every thread: ZMQ's I/O thread too) from the first message to the last:
the transport, the decoding, the index updates and the reads together, nothing else running.

    .venv/bin/python tools/kv_subscriber_cpu.py \\
        --subscriber before=OLD_COPY.py --subscriber after=scheduler/kv_subscriber.py \\
        --messages 5000 --rate 1000 --reads-per-s 500 --rounds 3 \\
        --json results/kv-subscriber-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import zmq
from twinroute.scheduler.kv_events import KvEventIndex

from twinroute.runtime import event_loop_runner

ROOT = Path(__file__).resolve().parent.parent
RECORDING = ROOT / "tests" / "fixtures" / "vllm_kv_events_real.jsonl"
TOPIC = b"kv"


def recorded_payloads() -> list[bytes]:
    """The recording's batches as vLLM encodes them: [ts, [tagged events], dp_rank]."""
    payloads = []
    with RECORDING.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if any(event["type"] == "AllBlocksCleared" for event in record["events"]):
                continue  # would empty the index every cycle
            payloads.append(msgspec.msgpack.encode([record["ts"], record["events"], 0]))
    return payloads


def publish(port_out: Any, go: Any, messages: int, rate: float) -> None:
    """The publisher process: bind, announce the port, wait for one subscriber, send."""
    payloads = recorded_payloads()
    context = zmq.Context()
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 1000)
    port_out.put(pub.bind_to_random_port("tcp://127.0.0.1"))
    while pub.recv()[:1] != b"\x01":  # the subscription
        pass
    go.wait()
    interval = 1.0 / rate
    start = time.monotonic()
    for seq in range(messages):
        delay = start + seq * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.send_multipart([TOPIC, seq.to_bytes(8, "big"), payloads[seq % len(payloads)]])
    pub.close()
    context.term()


def load_version(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"kv_subscriber_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def cpu_s_by_thread() -> dict[str, float]:
    """This process's CPU seconds by thread name (the kernel's schedstat, in ns): the
    interpreter's threads share the process's name, ZMQ's I/O thread is "ZMQbg/IO/0"."""
    by_name: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            used = int((task / "schedstat").read_text().split()[0]) / 1e9
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # a thread that ended meanwhile
        by_name[name] = by_name.get(name, 0.0) + used
    return by_name


async def read_like_picks(index: KvEventIndex, reads_per_s: float) -> None:
    """One engine read per pick, as a router with KV events makes them."""
    interval = 1.0 / reads_per_s
    while True:
        await asyncio.sleep(interval)
        index.precise_matched_blocks("engine", [0])


async def measure(
    module: ModuleType, *, messages: int, rate: float, reads_per_s: float
) -> dict[str, float]:
    spawn = multiprocessing.get_context("spawn")
    port_out, go = spawn.Queue(), spawn.Event()
    publisher = spawn.Process(target=publish, args=(port_out, go, messages, rate))
    publisher.start()
    port = await asyncio.to_thread(port_out.get, True, 30)
    index = KvEventIndex()
    subscriber = module.KvEventSubscriber(index)
    subscriber.set_endpoints(
        {"engine": module.KvEventSource(f"tcp://127.0.0.1:{port}", topic=TOPIC.decode())}
    )
    await subscriber.start()
    go.set()
    deadline = time.monotonic() + 30 + messages / rate
    reads = asyncio.create_task(read_like_picks(index, reads_per_s)) if reads_per_s > 0 else None
    while subscriber.messages_received < 1:  # noqa: ASYNC110 - a counter, not an event
        await asyncio.sleep(0.001)
    cpu_start, wall_start = time.process_time(), time.monotonic()
    threads_start = cpu_s_by_thread()
    while subscriber.messages_received < messages and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # the same few wake-ups for every version
        if reads is None:
            index.precise_matched_blocks("engine", [0])  # a version that waits to be read
    cpu = time.process_time() - cpu_start
    wall = time.monotonic() - wall_start
    threads = {
        name: used - threads_start.get(name, 0.0) for name, used in cpu_s_by_thread().items()
    }
    if reads is not None:
        reads.cancel()
    received = subscriber.messages_received
    await subscriber.stop()
    await asyncio.to_thread(publisher.join, 10)
    if received < messages:
        raise RuntimeError(f"{received} of {messages} messages arrived")
    counted = received - 1
    return {
        "messages": counted,
        "cpu_s": round(cpu, 4),
        "wall_s": round(wall, 3),
        "cpu_us_per_message": round(cpu / counted * 1e6, 2),
        "cpu_us_per_message_by_thread": {
            name: round(used / counted * 1e6, 2)
            for name, used in sorted(threads.items())
            if used > 0
        },
        "blocks_held": index.blocks_held("engine"),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--subscriber", action="append", required=True, metavar="NAME=PATH",
        help="a version of scheduler/kv_subscriber.py to measure (give two or more)",
    )  # fmt: skip
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    parser.add_argument(
        "--reads-per-s", type=float, default=500.0,
        help="index reads per second, one per pick (0: none but the progress checks)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    versions = {}
    for given in args.subscriber:
        name, _, path = given.partition("=")
        versions[name] = load_version(name, Path(path))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
    names = list(versions)
    for round_number in range(args.rounds):
        order = names if round_number % 2 == 0 else names[::-1]
        for name in order:
            result = await measure(
                versions[name], messages=args.messages, rate=args.rate,
                reads_per_s=args.reads_per_s,
            )  # fmt: skip
            runs[name].append(result)
            print(
                f"round {round_number + 1}/{args.rounds} {name}: "
                f"{result['cpu_us_per_message']:.1f} us CPU per message",
                file=sys.stderr,
                flush=True,
            )
    summary = {
        name: {"cpu_us_per_message_median": statistics.median(
            r["cpu_us_per_message"] for r in results
        )}
        for name, results in runs.items()
    }  # fmt: skip
    for name, figures in summary.items():
        print(f"{name}: {figures['cpu_us_per_message_median']:.1f} us CPU per message (median)")
    if args.json:
        command = "tools/kv_subscriber_cpu.py " + " ".join(sys.argv[1:])
        report = {
            "command": command,
            "messages": args.messages,
            "rate": args.rate,
            "reads_per_s": args.reads_per_s,
            "rounds": args.rounds,
            "summary": summary,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(event_loop_runner()(main()))

"""Three small costs of reading KV-event batches, each beside its alternative (best of rounds).

    .venv/bin/python benchmarks/hot_path/kv-read-on-pick/micro.py --json micro.json

- asking a SUB socket whether a batch waits: `getsockopt(zmq.EVENTS) & zmq.POLLIN` (pyzmq's
  flag enums) against the same with plain ints (what `scheduler/kv_subscriber.py` does);
- decoding a recorded vLLM batch and applying it to an index, as the subscriber does; and
  decoding alone, with the index's structs against structs naming only the
  fields the index reads (vLLM's BlockStored also carries every block's token ids);
- draining queued batches with `recv_multipart` against a `recv` loop with int flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import msgspec
import zmq
from twinroute.scheduler.kv_events import _TYPED_DECODER, KvEventIndex, decode_message

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
from kv_subscriber_cpu import recorded_payloads


class _Stored(msgspec.Struct, tag="BlockStored", gc=False):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class _Removed(msgspec.Struct, tag="BlockRemoved", gc=False):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class _Cleared(msgspec.Struct, tag="AllBlocksCleared", gc=False):
    pass


class _Payload(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_Stored | _Removed | _Cleared]
    data_parallel_rank: int | None = None


def best_us(function: Any, number: int, rounds: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=rounds)) / number * 1e6


def drain_us(sub: Any, pub: Any, payloads: list[bytes], drain: Any, count: int) -> float:
    for seq in range(count):
        pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payloads[seq % len(payloads)]])
    time.sleep(1.0)  # all of them queued at the SUB socket
    started = time.process_time()
    drained = drain()
    assert drained == count, (drained, count)
    return (time.process_time() - started) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    payloads = recorded_payloads()
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 1_000_000)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.5)
    events, pollin = int(zmq.EVENTS), int(zmq.POLLIN)
    noblock, rcvmore = int(zmq.NOBLOCK), int(zmq.RCVMORE)
    trimmed = msgspec.msgpack.Decoder(_Payload)

    def decode_with(decoder: Any) -> None:
        for payload in payloads:
            decoder.decode(payload)

    def drain_multipart() -> int:
        drained = 0
        while sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            sub.recv_multipart(zmq.NOBLOCK)
            drained += 1
        return drained

    def drain_recv() -> int:
        drained = 0
        while sub.getsockopt(events) & pollin:
            frames = [sub.recv(noblock)]
            while sub.getsockopt(rcvmore):
                frames.append(sub.recv(noblock))
            drained += 1
        return drained

    def decode_and_apply() -> None:
        index = KvEventIndex(clock=lambda: 0.0)
        for seq, payload in enumerate(payloads):
            index.apply_batch("e", decode_message([b"kv", seq.to_bytes(8, "big"), payload]))

    n = 100_000
    report: dict[str, Any] = {
        "command": "benchmarks/hot_path/kv-read-on-pick/micro.py " + " ".join(sys.argv[1:]),
        "us_per_socket_question": {
            "flag_enums": best_us(lambda: sub.getsockopt(zmq.EVENTS) & zmq.POLLIN, n, args.rounds),
            "plain_ints": best_us(lambda: sub.getsockopt(events) & pollin, n, args.rounds),
        },
        "us_per_batch_decoded_and_applied": {
            "index_structs": best_us(decode_and_apply, 50, args.rounds) / len(payloads),
        },
        "us_per_batch_decoded": {
            "index_structs": best_us(lambda: decode_with(_TYPED_DECODER), 50, args.rounds)
            / len(payloads),
            "fields_read_only": best_us(lambda: decode_with(trimmed), 50, args.rounds)
            / len(payloads),
        },
        "us_per_batch_drained": {"recv_multipart": [], "recv_loop_int_flags": []},
    }
    for _ in range(args.rounds):  # alternating, 20,000 queued batches each
        for name, drain in (
            ("recv_multipart", drain_multipart),
            ("recv_loop_int_flags", drain_recv),
        ):
            report["us_per_batch_drained"][name].append(
                round(drain_us(sub, pub, payloads, drain, 20_000), 2)
            )
    for table in (
        "us_per_socket_question",
        "us_per_batch_decoded_and_applied",
        "us_per_batch_decoded",
    ):
        report[table] = {key: round(value, 2) for key, value in report[table].items()}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    sub.close(linger=0)
    pub.close(linger=0)
    context.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

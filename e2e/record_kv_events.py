"""Record vLLM KV-cache events from ZMQ as JSON lines (runs with the vLLM venv's python).

vLLM's zmq publisher *connects* to its configured endpoint, so this subscriber binds it.
Each message is three frames: topic, an 8-byte big-endian sequence number, and a msgpack
payload `[timestamp, [event, ...], data_parallel_rank]`. In vllm 0.32 each event is a map
whose "type" names it: BlockStored (block_hashes as 64-bit ints, parent_block_hash, token_ids,
block_size, lora_id, medium, ...), BlockRemoved (block_hashes, medium) or AllBlocksCleared
(sent on /reset_prefix_cache). Any bytes are written as hex strings. Stops after --seconds,
or on SIGTERM.

    .tools/vllm-venv/bin/python e2e/record_kv_events.py --bind tcp://127.0.0.1:5557 --out ev.jsonl
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

import msgspec
import zmq


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bind", required=True, help="tcp://127.0.0.1:PORT")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    if not args.bind.startswith("tcp://127.0.0.1:"):
        parser.error("--bind must be tcp://127.0.0.1:PORT")

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.bind(args.bind)
    print(f"bound {args.bind}", flush=True)
    deadline = time.monotonic() + args.seconds
    with open(args.out, "w", encoding="utf-8") as out:
        while not stopping and time.monotonic() < deadline:
            if not socket.poll(timeout=200):
                continue
            frames = socket.recv_multipart()
            if len(frames) != 3:
                print(f"skipped a message of {len(frames)} frames", flush=True)
                continue
            topic, sequence, payload = frames
            ts, events, dp_rank = msgspec.msgpack.decode(payload)
            record = {
                "topic": topic.decode(errors="replace"),
                "seq": int.from_bytes(sequence, "big"),
                "ts": ts,
                "dp_rank": dp_rank,
                "events": jsonable(events),
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
    socket.close(linger=0)
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

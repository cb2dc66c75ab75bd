#!/usr/bin/env python3
"""What long prompts cost the router's event loop, piece by piece.

1. Does a Hugging Face tokenizer call let other threads run? (Why the router offloads with
   `encode_batch` and not `encode`.) A worker thread tokenizes a long prompt three times while
   the main thread counts loop turns for 0.3 s; the main thread's progress, relative to the
   same 0.3 s alone, is what an event loop keeps while a request is tokenized on a worker
   thread (1.0: unhindered; near 0: stalled).
2. Tokenizing a 64 KiB prompt (`encode`), milliseconds, best of three: what one such
   prompt holds the loop for when tokenized inline.
3. Parsing a request body with Python's json (which holds the GIL, so it stays on the loop):
   milliseconds for 1 MiB and 16 MiB (the router's default body limit), best of three.

    python tools/loop_costs.py --tokenizer .tools/tiny-llama/tokenizer.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer


def progress(work: Callable[[], object] | None, seconds: float = 0.3) -> int:
    turns = 0
    worker = threading.Thread(target=work) if work is not None else None
    if worker is not None:
        worker.start()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        turns += 1
    if worker is not None:
        worker.join()
    return turns


def tokenize_ms(tokenizer: Tokenizer, *, kib: int) -> float:
    text = "".join(f"w{i} " for i in range(kib * 1024 // 5))[: kib * 1024]
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        tokenizer.encode(text, add_special_tokens=False)
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def parse_ms(mib: int) -> float:
    prompt = "word " * (mib * 1024 * 1024 // 5)
    raw = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 4}).encode()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        json.loads(raw)
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--prompt-kib", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(args.tokenizer)
    text = "".join(f"w{i} " for i in range(args.prompt_kib * 1024 // 5))
    alone = progress(None)
    result = {
        "prompt_kib": args.prompt_kib,
        "main_thread_progress": {
            "encode": progress(lambda: [tokenizer.encode(text) for _ in range(3)]) / alone,
            "encode_batch": progress(lambda: [tokenizer.encode_batch([text]) for _ in range(3)])
            / alone,
        },
    }
    result["tokenize_64_kib_ms"] = tokenize_ms(tokenizer, kib=64)
    result["json_parse_ms"] = {f"{mib} MiB": parse_ms(mib) for mib in (1, 16)}
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

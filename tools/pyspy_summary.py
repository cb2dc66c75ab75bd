"""Own and inclusive shares of functions in a py-spy recording (`--format raw`).

    py-spy record -p PID -d 10 -r 400 --nonblocking -f raw -o router.spy
    .venv/bin/python tools/pyspy_summary.py router.spy [--top 30]

py-spy (PyPI, installed apart from twinroute) samples the process's stacks without slowing it
much, and, unlike cProfile, charges the time spent inside C calls (a socket write, the
tokenizer) to the Python frame that made them. A sample's "own" function is the innermost
frame; "inclusive" counts every function on the stack once. Paths are cut to the part inside
the package or the standard library, so the output holds no machine's paths. A share of the
event loop's own frame (`Runner.run`) is time in its C code, idle waits included when py-spy
cannot tell them apart.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys

_FRAME = re.compile(r"(?P<function>.*) \((?P<path>.*?):(?P<line>\d+)\)$")
_CUTS = ("site-packages/", "-none-any/", "python3.11/", "python3.12/", "python3.13/")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["path"]
    for cut in _CUTS:
        path = path.split(cut)[-1]
    if path.startswith("/"):  # a script outside any package: its name alone
        path = pathlib.PurePath(path).name
    return f"{match['function']} ({path})"


def summarise(lines: list[str], top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        if not line.strip():
            continue
        stack, count_text = line.rstrip().rsplit(" ", 1)
        count = int(count_text)
        total += count
        names = [frame_name(frame) for frame in stack.split(";")]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    if total == 0:
        return "no samples\n"
    out = [f"{total} samples", "", "own:"]
    out += [f"{100 * count / total:5.1f}%  {name}" for name, count in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"{100 * count / total:5.1f}%  {name}" for name, count in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recording", type=pathlib.Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    sys.stdout.write(summarise(args.recording.read_text().splitlines(), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

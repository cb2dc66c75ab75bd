"""What one cProfile run spent that another did not, by function (own time and cumulative).

.venv/bin/python benchmarks/hot_path/kv-read-on-pick/profile_diff.py BASE.prof OTHER.prof
"""

from __future__ import annotations

import pstats
import sys


def by_function(path: str) -> dict[str, tuple[float, float, int]]:
    stats = pstats.Stats(path)
    table: dict[str, tuple[float, float, int]] = {}
    for (file, line, name), (_calls, calls, own, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        table[f"{file.rsplit('/', 1)[-1]}:{line}:{name}"] = (own, cumulative, calls)
    return table


def main() -> None:
    base, other = by_function(sys.argv[1]), by_function(sys.argv[2])
    none = (0.0, 0.0, 0)
    total_base = sum(own for own, _, _ in base.values())
    total_other = sum(own for own, _, _ in other.values())
    print(f"profiled CPU: {total_base:.3f} s -> {total_other:.3f} s")
    for title, column in (("own time", 0), ("cumulative time", 1)):
        print(f"\nlargest increases in {title} (s), calls before/after:")
        names = sorted(
            set(base) | set(other),
            key=lambda n: -(other.get(n, none)[column] - base.get(n, none)[column]),
        )
        for name in names[:30]:
            was, now = base.get(name, none), other.get(name, none)
            print(f"{now[column] - was[column]:+8.3f}  {was[2]:>7}/{now[2]:<7} {name}")


if __name__ == "__main__":
    main()

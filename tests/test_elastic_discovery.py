"""`--endpoints-file` is re-read when it changes: how the live elastic bench (and anyone
without Kubernetes) scales the scheduler's pool, with a bad edit never emptying it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from twinroute.scheduler.discovery import WatchedFileSource


def _yaml(*ports: int) -> str:
    lines = ["endpoints:"]
    lines += [f"  - {{id: e{p}, address: 127.0.0.1:{p}}}" for p in ports]
    return "\n".join(lines) + "\n"


class _Done(Exception):
    pass


def _edit(path: Path, text: str | None) -> None:
    if text is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(text)


def _edits(path: Path, texts: list[str | None]) -> Callable[[float], object]:
    """A sleep that applies the next edit instead of waiting (None deletes the file)."""
    pending = list(texts)

    async def sleep(_seconds: float) -> None:
        if not pending:
            raise _Done
        _edit(path, pending.pop(0))

    return sleep


async def _snapshots(source: WatchedFileSource) -> list[list[str]]:
    seen: list[list[str]] = []
    try:
        async for endpoints in source.snapshots():
            seen.append([e.id for e in endpoints])
    except _Done:
        pass
    return seen


async def test_changes_are_picked_up_and_bad_edits_keep_the_last_list(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(_yaml(8001, 8002))
    edits = [
        _yaml(8001, 8002),  # rewritten unchanged: no snapshot
        _yaml(8001, 8002, 8003, 8004),  # scale out
        "endpoints: [",  # broken YAML: ignored
        None,  # file gone: ignored
        "endpoints:\n  - {address: nowhere}\n",  # invalid address: ignored
        _yaml(8001, 8002),  # scale in
    ]
    source = WatchedFileSource(path=path, sleep=_edits(path, edits))  # type: ignore[arg-type]
    assert await _snapshots(source) == [
        ["e8001", "e8002"],
        ["e8001", "e8002", "e8003", "e8004"],
        ["e8001", "e8002"],
    ]


def test_a_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text("endpoints:\n  - {id: a}\n")
    with pytest.raises(ValueError, match="needs an address"):
        WatchedFileSource(path=path)
    with pytest.raises(OSError):
        WatchedFileSource(path=tmp_path / "missing.yaml")

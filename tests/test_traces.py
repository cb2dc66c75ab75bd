from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from twinroute.simulator.traces import (
    PrefixModel,
    SharedPrefixWorkload,
    TraceChunk,
    TraceFormatError,
    bundled_mooncake_trace,
    generate_shared_prefix,
    open_trace,
    read_azure,
    read_mooncake,
    replicate,
    scale_time,
    summarize,
    take,
)


def _mooncake_line(ts: int, tokens: int, out: int, ids: list[int]) -> str:
    return json.dumps(
        {"timestamp": ts, "input_length": tokens, "output_length": out, "hash_ids": ids}
    )


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _all(chunks: list[TraceChunk]) -> tuple[np.ndarray, list[list[int]]]:
    arrivals = np.concatenate([c.arrival_s for c in chunks])
    blocks = [c.blocks(i).tolist() for c in chunks for i in range(len(c))]
    return arrivals, blocks


def test_mooncake_reads_arrays_relative_to_first_request(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "t.jsonl",
        [
            _mooncake_line(1000, 1024, 5, [0, 1]),
            _mooncake_line(1500, 700, 3, [0, 2]),
            "",
            _mooncake_line(4000, 10, 1, [9]),
        ],
    )
    chunks = list(read_mooncake(path, block_size=512, chunk_requests=2))
    assert [len(c) for c in chunks] == [2, 1]
    arrivals, blocks = _all(chunks)
    assert arrivals.tolist() == [0.0, 0.5, 3.0]
    assert blocks == [[0, 1], [0, 2], [9]]
    assert chunks[0].prompt_tokens.tolist() == [1024, 700]
    assert chunks[0].output_tokens.tolist() == [5, 3]


@pytest.mark.parametrize(
    ("lines", "bad_line", "fragment"),
    [
        ([_mooncake_line(0, 512, 1, [0]), "{not json"], 2, "not a Mooncake"),
        ([_mooncake_line(0, 512, 1, [0]), '{"timestamp": 1}'], 2, "not a Mooncake"),
        ([_mooncake_line(0, 1024, 1, [0])], 1, "needs 2"),
        ([_mooncake_line(0, 0, 1, [])], 1, "input_length must be > 0"),
        ([_mooncake_line(5, 512, 1, [0]), _mooncake_line(1, 512, 1, [1])], 2, "sorted"),
    ],
    ids=["invalid-json", "missing-keys", "wrong-block-count", "empty-prompt", "unsorted"],
)
def test_mooncake_bad_line_names_the_line(
    tmp_path: Path, lines: list[str], bad_line: int, fragment: str
) -> None:
    path = _write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(TraceFormatError, match=fragment) as error:
        list(read_mooncake(path, block_size=512))
    assert f"{path}:{bad_line}:" in str(error.value)


def test_bundled_trace_matches_its_description() -> None:
    summary = summarize(read_mooncake(bundled_mooncake_trace()))
    assert summary.requests == 3993
    assert summary.duration_s == pytest.approx(1022.025)
    assert 15_000 < summary.mean_prompt_tokens < 16_000


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def test_azure_reads_times_and_shares_group_prefixes(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "a.csv",
        [
            AZURE_HEADER,
            "2023-11-16 18:17:03.9799600,4808,10",
            "2023-11-16 18:17:04.0319600,3180,8",
            "2023-11-16 18:17:05.9799600,100,8",
        ],
    )
    model = PrefixModel(groups=1, prefix_tokens=2048, seed=1)
    chunks = list(read_azure(path, block_size=512, prefix_model=model))
    arrivals, blocks = _all(chunks)
    assert arrivals == pytest.approx([0.0, 0.052, 2.0])
    # One group: the first 4 blocks (2048 tokens) are shared; the rest is unique.
    assert blocks[0][:4] == blocks[1][:4]
    assert len(blocks[0]) == 10 and len(blocks[1]) == 7
    assert not set(blocks[0][4:]) & set(blocks[1][4:])
    # A prompt shorter than the group prefix still keeps its last token uncached.
    assert len(blocks[2]) == 1 and blocks[2][0] not in blocks[0]


@pytest.mark.parametrize(
    ("rows", "bad_line", "fragment"),
    [
        (["2023-11-16 18:17:03.97,10,1", "yesterday,10,1"], 3, "not an Azure"),
        (["2023-11-16 18:17:03.97,ten,1"], 2, "not an Azure"),
        (["2023-11-16 18:17:03.97,10"], 2, "want 3"),
        (["2023-11-16 18:17:03.97,0,1"], 2, "ContextTokens must be > 0"),
        (["2023-11-16 18:17:05.00,10,1", "2023-11-16 18:17:04.00,10,1"], 3, "sorted"),
    ],
    ids=["bad-time", "bad-int", "short-row", "empty-prompt", "unsorted"],
)
def test_azure_bad_row_names_the_line(
    tmp_path: Path, rows: list[str], bad_line: int, fragment: str
) -> None:
    path = _write(tmp_path, "bad.csv", [AZURE_HEADER, *rows])
    with pytest.raises(TraceFormatError, match=fragment) as error:
        list(read_azure(path))
    assert f"{path}:{bad_line}:" in str(error.value)


def test_azure_wrong_header_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "h.csv", ["time,in,out", "1,2,3"])
    with pytest.raises(TraceFormatError, match=r":1: want the header"):
        list(read_azure(path))


def test_synthetic_is_deterministic_and_follow_ups_share_prefixes() -> None:
    workload = SharedPrefixWorkload(requests=300, system_prompts=3, seed=7)
    first = _all(list(generate_shared_prefix(workload, block_size=512, chunk_requests=64)))
    again = _all(list(generate_shared_prefix(workload, block_size=512, chunk_requests=64)))
    assert first[0].tolist() == again[0].tolist() and first[1] == again[1]
    arrivals, blocks = first
    assert np.all(np.diff(arrivals) >= 0)
    heads = {tuple(b[:8]) for b in blocks}
    assert len(heads) == 3, "every prompt starts with one of the 3 system prompts"
    # Follow-up turns extend an earlier prompt: some prompt shares more than the system prompt.
    longest_shared = max(
        sum(1 for _ in _common_prefix(a, b)) for a in blocks[:100] for b in blocks[:100] if a != b
    )
    assert longest_shared > 8


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    out = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        out.append(x)
    return out


def test_scale_time_multiplies_arrivals() -> None:
    workload = SharedPrefixWorkload(requests=50, seed=1)
    base = _all(list(generate_shared_prefix(workload)))[0]
    scaled = _all(list(scale_time(generate_shared_prefix(workload), factor=0.5)))[0]
    assert scaled == pytest.approx(base * 0.5)
    with pytest.raises(ValueError, match="> 0"):
        list(scale_time(generate_shared_prefix(workload), factor=0.0))


def test_replicate_interleaves_disjoint_copies_across_chunks() -> None:
    workload = SharedPrefixWorkload(requests=200, seed=3)
    original = _all(list(generate_shared_prefix(workload, chunk_requests=1000)))
    chunks = list(
        replicate(
            generate_shared_prefix(workload, chunk_requests=17),
            copies=3,
            id_stride=1_000_000,
            spacing_s=0.25,
        )
    )
    arrivals, blocks = _all(chunks)
    assert len(arrivals) == 600
    assert np.all(np.diff(arrivals) >= 0)
    copies = [sorted(tuple(b) for b in blocks if b[0] // 1_000_000 == k) for k in range(3)]
    expected = sorted(tuple(b) for b in original[1])
    for k in range(3):
        assert [tuple(x - k * 1_000_000 for x in b) for b in copies[k]] == expected


def test_open_trace_rejects_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown trace format"):
        open_trace(bundled_mooncake_trace(), trace_format="parquet")
    with pytest.raises(FileNotFoundError):
        open_trace(tmp_path / "nope.jsonl", trace_format="mooncake")


def test_take_keeps_the_first_requests_across_chunks() -> None:
    workload = SharedPrefixWorkload(requests=100, seed=4)
    first = _all(list(take(generate_shared_prefix(workload, chunk_requests=30), requests=45)))
    whole = _all(list(generate_shared_prefix(workload)))
    assert first[0].tolist() == whole[0][:45].tolist()
    assert first[1] == whole[1][:45]

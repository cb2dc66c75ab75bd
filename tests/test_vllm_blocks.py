"""VllmBlockHasher reproduces vLLM's own prefix-cache block hashes.

Parity is checked two ways: against the hashes a real vLLM 0.32 engine published in
tests/fixtures/vllm_kv_events_real.jsonl (every chain it stored, roots and continuations), and,
when the vLLM venv is present at .tools/vllm-venv, against vLLM's own request block hasher run
in a subprocess (PYTHONHASHSEED, cache_salt and sha256_cbor cases the fixture does not cover).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twinroute.scheduler.vllm_blocks import (
    DEFAULT_SEED,
    UnsupportedHashAlgoError,
    VllmBlockHasher,
    event_hash,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "vllm_kv_events_real.jsonl"
FIXTURE_BLOCK_SIZE = 32
# vLLM 0.32's NONE_HASH for sha256 without PYTHONHASHSEED (kv_cache_utils.NONE_HASH.hex()).
VLLM_DEFAULT_ROOT = "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198"


def stored_events() -> list[dict[str, Any]]:
    events = []
    with FIXTURE.open(encoding="utf-8") as lines:
        for line in lines:
            events += [e for e in json.loads(line)["events"] if e["type"] == "BlockStored"]
    return events


def test_root_is_vllms_none_hash() -> None:
    hasher = VllmBlockHasher(FIXTURE_BLOCK_SIZE)
    assert hasher.seed == DEFAULT_SEED
    assert hasher.root.hex() == VLLM_DEFAULT_ROOT


def test_every_root_chain_of_the_real_engine_matches() -> None:
    hasher = VllmBlockHasher(FIXTURE_BLOCK_SIZE)
    roots = [e for e in stored_events() if e["parent_block_hash"] is None]
    checked = 0
    for event in roots:
        assert event["block_size"] == FIXTURE_BLOCK_SIZE
        assert hasher.block_hashes(event["token_ids"]) == event["block_hashes"]
        checked += len(event["block_hashes"])
    assert len(roots) == 32
    assert checked == 471


def test_continuations_match_when_hashed_from_the_whole_prompt() -> None:
    """A continuation event names its parent by hash only; the scheduler hashes whole prompts."""
    hasher = VllmBlockHasher(FIXTURE_BLOCK_SIZE)
    tokens_through: dict[int, list[int]] = {}  # block hash -> the prompt's tokens up to it
    continuations = 0
    for event in stored_events():
        parent = event["parent_block_hash"]
        prefix = [] if parent is None else tokens_through[parent]
        tokens = prefix + event["token_ids"]
        hashes = hasher.block_hashes(tokens)
        assert hashes[len(prefix) // FIXTURE_BLOCK_SIZE :] == event["block_hashes"]
        for i, block_hash in enumerate(event["block_hashes"]):
            tokens_through[block_hash] = tokens[: len(prefix) + FIXTURE_BLOCK_SIZE * (i + 1)]
        continuations += parent is not None
    assert continuations == 196


def test_only_full_blocks_are_hashed_and_prefixes_share_hashes() -> None:
    hasher = VllmBlockHasher(4)
    tokens = list(range(100, 111))  # two full blocks and three tokens
    hashes = hasher.block_hashes(tokens)
    assert len(hashes) == 2
    assert hasher.block_hashes(tokens[:8]) == hashes
    assert hasher.block_hashes(tokens[:4]) == hashes[:1]
    assert hasher.block_hashes(tokens[:3]) == []
    assert hasher.block_hashes([]) == []
    changed = [*tokens[:5], 0, *tokens[6:]]
    assert hasher.block_hashes(changed)[0] == hashes[0]
    assert hasher.block_hashes(changed)[1] != hashes[1]


def test_hashes_are_the_last_eight_digest_bytes() -> None:
    hasher = VllmBlockHasher(4)
    digests = hasher.block_digests([1, 2, 3, 4, 5, 6, 7, 8])
    assert [len(d) for d in digests] == [32, 32]
    assert hasher.block_hashes([1, 2, 3, 4, 5, 6, 7, 8]) == [event_hash(d) for d in digests]
    expected_first = hashlib.sha256(
        pickle.dumps((hasher.root, (1, 2, 3, 4), None), protocol=pickle.HIGHEST_PROTOCOL)
    ).digest()
    assert digests[0] == expected_first
    assert all(0 <= h < 2**64 for h in hasher.block_hashes(list(range(64))))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint32, np.uint64])
def test_numpy_tokens_hash_like_python_ints(dtype: type[np.integer[Any]]) -> None:
    hasher = VllmBlockHasher(16)
    tokens = [0, 255, 256, 65535, 65536, 151_000, 2**31 - 1] * 10
    expected = hasher.block_hashes(tokens)
    assert hasher.block_hashes(np.array(tokens, dtype=dtype)) == expected
    # A list of numpy scalars pickles differently; the hasher must not be fooled by it.
    assert hasher.block_hashes(list(np.array(tokens, dtype=dtype))) == expected


def test_seed_is_the_engines_pythonhashseed() -> None:
    tokens = list(range(64))
    default = VllmBlockHasher(16).block_hashes(tokens)
    assert VllmBlockHasher(16, seed=DEFAULT_SEED).block_hashes(tokens) == default
    seeded = VllmBlockHasher(16, seed="0")
    assert seeded.root == hashlib.sha256(pickle.dumps("0", protocol=5)).digest()
    assert seeded.block_hashes(tokens) != default
    assert VllmBlockHasher(16, seed="0").block_hashes(tokens) == seeded.block_hashes(tokens)


def test_cache_salt_changes_every_block_through_the_chain() -> None:
    hasher = VllmBlockHasher(4)
    tokens = list(range(12))
    plain = hasher.block_hashes(tokens)
    salted = hasher.block_hashes(tokens, cache_salt="tenant-a")
    assert all(a != b for a, b in zip(plain, salted, strict=True))
    assert hasher.block_hashes(tokens, cache_salt="") == plain  # vLLM ignores an empty salt
    # The salt is an extra key of block 0 only; later blocks differ through their parent.
    first, second, _ = hasher.block_digests(tokens, cache_salt="tenant-a")
    assert (
        first
        == hashlib.sha256(
            pickle.dumps((hasher.root, (0, 1, 2, 3), (("cache_salt", "tenant-a"),)), protocol=5)
        ).digest()
    )
    assert second == hashlib.sha256(pickle.dumps((first, (4, 5, 6, 7), None), protocol=5)).digest()


@pytest.mark.parametrize("algo", ["xxhash", "xxhash_cbor"])
def test_xxhash_is_refused_with_the_reason(algo: str) -> None:
    with pytest.raises(UnsupportedHashAlgoError, match="random per-process seed"):
        VllmBlockHasher(16, algo=algo)
    with pytest.raises(UnsupportedHashAlgoError, match="random per-process seed"):
        VllmBlockHasher(16, algo=algo, seed="42")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(UnsupportedHashAlgoError, match="unknown prefix_caching_hash_algo"):
        VllmBlockHasher(16, algo="md5")
    with pytest.raises(ValueError, match="block_size"):
        VllmBlockHasher(0)


def test_sha256_cbor_needs_cbor2() -> None:
    try:
        import cbor2  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedHashAlgoError, match="cbor2"):
            VllmBlockHasher(16, algo="sha256_cbor")
    else:
        assert VllmBlockHasher(16, algo="sha256_cbor").block_hashes(list(range(16)))


# --- against vLLM itself ---------------------------------------------------------------------

# Runs in the vLLM venv: vLLM's request block hasher on real `Request` objects, and this
# repository's vllm_blocks.py loaded by path (it needs only numpy, and cbor2 for sha256_cbor,
# which the vLLM venv has and the scheduler's may not).
_VLLM_SCRIPT = r"""
import importlib.util, json, os, sys
from vllm import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
from vllm.v1.request import Request

cases, module_path = json.loads(sys.argv[1]), sys.argv[2]
spec = importlib.util.spec_from_file_location("vllm_blocks_under_test", module_path)
ours = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ours)

def vllm_hashes(tokens, block_size, algo, seed, cache_salt):
    if seed is None:
        os.environ.pop("PYTHONHASHSEED", None)
    else:
        os.environ["PYTHONHASHSEED"] = seed
    hash_fn = get_hash_fn_by_name(algo)
    kv_cache_utils.init_none_hash(hash_fn)
    request = Request(
        request_id="r", prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=1), pooling_params=None,
        cache_salt=cache_salt,
        block_hasher=kv_cache_utils.get_request_block_hasher(block_size, hash_fn),
    )
    return [kv_cache_utils.maybe_convert_block_hash(h) for h in request.block_hashes]

out = []
for case in cases:
    theirs = vllm_hashes(**case)
    hasher = ours.VllmBlockHasher(case["block_size"], algo=case["algo"], seed=case["seed"])
    out.append({"vllm": theirs, "ours_in_vllm_venv": hasher.block_hashes(
        case["tokens"], cache_salt=case["cache_salt"])})
print(json.dumps(out))
"""

_TOKENS = [int(t) for t in np.random.default_rng(7).integers(0, 150_000, 16 * 5 + 3)]


@dataclass(frozen=True)
class Case:
    block_size: int
    algo: str = "sha256"
    seed: str | None = None
    cache_salt: str | None = None
    tokens: tuple[int, ...] = tuple(_TOKENS)


_CASES = [
    Case(16),
    Case(16, seed="123"),
    Case(16, cache_salt="t-1"),
    Case(32, algo="sha256_cbor"),
    Case(16, algo="sha256_cbor", seed="9", cache_salt="s"),
]


@pytest.fixture(scope="module")
def vllm_reference(vllm_venv_python: Path) -> list[dict[str, list[int]]]:
    python = vllm_venv_python
    completed = subprocess.run(
        [
            str(python),
            "-c",
            _VLLM_SCRIPT,
            json.dumps([asdict(case) for case in _CASES]),
            str(ROOT / "scheduler" / "vllm_blocks.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result: list[dict[str, list[int]]] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_vllms_own_hasher_agrees(vllm_reference: list[dict[str, list[int]]]) -> None:
    for case, answer in zip(_CASES, vllm_reference, strict=True):
        assert len(answer["vllm"]) == len(case.tokens) // case.block_size
        # Our module, run inside the vLLM venv (which has cbor2 for the sha256_cbor cases).
        assert answer["ours_in_vllm_venv"] == answer["vllm"], case
        if case.algo == "sha256":
            ours = VllmBlockHasher(case.block_size, seed=case.seed)
            assert ours.block_hashes(case.tokens, cache_salt=case.cache_salt) == answer["vllm"]

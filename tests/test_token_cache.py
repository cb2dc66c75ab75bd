"""The prefix token cache: the same ids as tokenizing whole, and only the new part tokenized."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers
from twinroute.scheduler.openai_queries import Tokenizer
from twinroute.scheduler.token_cache import (
    PROBE_TEXTS,
    PrefixTokenCache,
    safe_boundaries,
    splits_safely,
)

WORDS = ["alpha", "beta", "gamma", "it's", "x1", "2026", "naïve", "東京", "🚀", "(f)", "a.b"]
GAPS = [" ", " ", " ", "  ", "\n", "\n\n", " \n ", "\t", "   "]


def random_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(GAPS) for _ in range(words))


def _train(
    pre_tokenizer: pre_tokenizers.PreTokenizer | None, normalizer: normalizers.Normalizer | None
) -> HFTokenizer:
    rng = random.Random(7)
    corpus = [random_text(rng, 40) for _ in range(400)] + list(PROBE_TEXTS) * 20
    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>"))
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if normalizer is None else []
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>"], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def byte_level() -> HFTokenizer:
    """Byte-level BPE with the GPT-2 split, as Llama 3 and Qwen tokenize."""
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), None)


@pytest.fixture(scope="module")
def llama2_like() -> HFTokenizer:
    """No pre-tokenizer and a marker prepended to every call, as Llama 2's tokenizer.json does:
    its ids change when a text is cut before a word."""
    return _train(
        None, normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    )


class CountingEncoder:
    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.tokenizer = tokenizer
        self.chars = 0

    def __call__(self, texts: list[str]) -> list[list[int]]:
        self.chars += sum(map(len, texts))
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def whole(tokenizer: HFTokenizer, text: str) -> list[int]:
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False).ids
    return ids


def test_safe_boundaries_sit_before_a_space_that_starts_a_word() -> None:
    text = "ab  cd\n ef gh"
    assert safe_boundaries(text, start=0, every=1) == [3, 7, 10]
    assert safe_boundaries(text, start=0, every=5) == [7]
    assert safe_boundaries("trailing ", start=0, every=1) == []
    assert safe_boundaries("no_spaces_at_all", start=0, every=1) == []


def test_the_probe_accepts_byte_level_bpe_and_refuses_a_prepending_tokenizer(
    byte_level: HFTokenizer, llama2_like: HFTokenizer
) -> None:
    assert splits_safely(CountingEncoder(byte_level))
    assert not splits_safely(CountingEncoder(llama2_like))


@pytest.mark.parametrize(("chunk_chars", "max_chunks"), [(1, 100_000), (16, 100_000), (8, 12)])
def test_ids_equal_tokenizing_whole_for_prompts_that_share_prefixes(
    byte_level: HFTokenizer, chunk_chars: int, max_chunks: int
) -> None:
    # Conversations that grow turn by turn, and prompts that share a system prompt, with tiny
    # chunks (boundaries everywhere) and a tiny trie (eviction all the time).
    cache = PrefixTokenCache(
        CountingEncoder(byte_level), chunk_chars=chunk_chars, max_chunks=max_chunks
    )
    rng = random.Random(chunk_chars)
    system = random_text(rng, 30)
    conversations = [system + random_text(rng, 5) for _ in range(6)]
    for _ in range(60):
        index = rng.randrange(len(conversations))
        conversations[index] += random_text(rng, rng.randint(1, 12))
        text = conversations[index]
        assert cache.encode(text).tolist() == whole(byte_level, text), text
        assert len(cache) <= max_chunks
    for text in ["", " ", "x", "  lead", "trail  ", *PROBE_TEXTS]:
        assert cache.encode(text).tolist() == whole(byte_level, text), text


def test_a_repeated_prefix_is_not_tokenized_again(byte_level: HFTokenizer) -> None:
    encoder = CountingEncoder(byte_level)
    cache = PrefixTokenCache(encoder, chunk_chars=64)
    system = random_text(random.Random(1), 300)
    # The first prompt is tokenized whole; the second, whose first chunk came back, is cut
    # into chunks and remembered.
    cache.encode(system + " first question")
    cache.encode(system + " second question")
    assert len(cache) > 0
    before = encoder.chars

    question = " third question, a little longer"
    ids = cache.encode(system + question)

    assert ids.tolist() == whole(byte_level, system + question)
    # Only the last chunk before the end and the question were tokenized again.
    assert encoder.chars - before <= 64 + 16 + len(question)


def test_prompts_that_differ_only_in_a_short_ending_retokenize_little_more(
    byte_level: HFTokenizer,
) -> None:
    # A system prompt and short questions: after the last full chunk the text is cut in
    # quarter chunks, so a new question costs at most a quarter chunk of the shared text.
    for seed in range(10):
        encoder = CountingEncoder(byte_level)
        cache = PrefixTokenCache(encoder, chunk_chars=64)
        system = random_text(random.Random(seed), 300)
        for number in range(3):
            cache.encode(f"{system} question {number}")
        before = encoder.chars
        text = f"{system} question 3"
        assert cache.encode(text).tolist() == whole(byte_level, text)
        assert encoder.chars - before <= 64 // 4 + len(" question 3"), seed


def test_prompts_that_share_nothing_are_tokenized_whole_and_not_kept(
    byte_level: HFTokenizer,
) -> None:
    calls: list[list[str]] = []
    encoder = CountingEncoder(byte_level)

    def recording(texts: list[str]) -> list[list[int]]:
        calls.append(texts)
        return encoder(texts)

    cache = PrefixTokenCache(recording, chunk_chars=32)
    rng = random.Random(2)
    for index in range(20):
        text = f"request{index} " + random_text(rng, 40)
        assert cache.encode(text).tolist() == whole(byte_level, text)
    assert all(len(texts) == 1 for texts in calls)
    assert len(cache) == 0


def test_eviction_takes_leaves_first_so_a_shared_root_keeps_hitting(
    byte_level: HFTokenizer,
) -> None:
    encoder = CountingEncoder(byte_level)
    cache = PrefixTokenCache(encoder, chunk_chars=32, max_chunks=12)
    rng = random.Random(3)
    system = random_text(rng, 20)  # a few chunks
    for _ in range(40):  # each one's own chunks push the older ones out
        cache.encode(system + random_text(rng, 12))
    before = encoder.chars
    cache.encode(system + " a new question")
    assert encoder.chars - before < len(system) / 2


def test_the_tokenizer_class_uses_the_cache_only_when_the_probe_passes(
    tmp_path: Path,
    byte_level: HFTokenizer,
    llama2_like: HFTokenizer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    byte_level.save(str(tmp_path / "byte.json"))
    llama2_like.save(str(tmp_path / "llama2.json"))
    text = random_text(random.Random(5), 200)

    cached = Tokenizer(str(tmp_path / "byte.json"))
    assert cached.cache is not None
    assert list(cached.encode(text)) == whole(byte_level, text)
    assert Tokenizer(str(tmp_path / "byte.json"), cache_chunks=0).cache is None

    with caplog.at_level(logging.WARNING):
        refused = Tokenizer(str(tmp_path / "llama2.json"))
    assert refused.cache is None
    assert "merges across spaces" in caplog.text
    assert list(refused.encode(text)) == whole(llama2_like, text)


def test_long_uncached_rests_are_tokenized_on_a_worker_thread(
    tmp_path: Path, byte_level: HFTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    byte_level.save(str(tmp_path / "byte.json"))
    tokenizer = Tokenizer(str(tmp_path / "byte.json"))
    threads: list[object] = []
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(function: object, *args: object) -> object:
        threads.append(function)
        return await real_to_thread(function, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    text = random_text(random.Random(9), 1200)
    assert len(text) > 4096

    async def thrice() -> list[object]:
        return [
            await tokenizer.encode_async(text + ending, offload=True)
            for ending in ("", " more", " and more")
        ]

    answers = asyncio.run(thrice())
    for answer, ending in zip(answers, ("", " more", " and more"), strict=True):
        assert np.asarray(answer).tolist() == whole(byte_level, text + ending)
    # The third call found all but its last words cached (the second one cut and kept them).
    assert len(threads) == 2


def test_the_router_counts_prompt_characters_by_where_their_ids_came_from(
    tmp_path: Path, byte_level: HFTokenizer
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from twinroute.scheduler.openai_queries import register_tokenizer_metrics

    byte_level.save(str(tmp_path / "byte.json"))
    tokenizer = Tokenizer(str(tmp_path / "byte.json"))
    registry = CollectorRegistry()
    register_tokenizer_metrics(tokenizer, registry, name="twinroute_router_prompt_chars")
    system = random_text(random.Random(4), 100)
    for question in (" one", " two", " three"):
        tokenizer.encode(system + question)
    text = generate_latest(registry).decode()
    assert tokenizer.cache is not None
    cached, tokenized = tokenizer.cache.cached_chars, tokenizer.cache.tokenized_chars
    assert cached > len(system) / 2 and tokenized > len(system)
    assert f'twinroute_router_prompt_chars_total{{source="cached"}} {float(cached)}' in text
    assert f'twinroute_router_prompt_chars_total{{source="tokenized"}} {float(tokenized)}' in text
    # No cache, no series.
    empty = CollectorRegistry()
    register_tokenizer_metrics(None, empty, name="twinroute_router_prompt_chars")
    assert "prompt_chars" not in generate_latest(empty).decode()

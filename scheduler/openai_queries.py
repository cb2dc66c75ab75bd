"""One OpenAI request -> one `PickQuery`, the same way on every front end.

The Python router and the Envoy endpoint picker both turn a parsed request into the scheduler's
query here, so the same request gets the same prefix keys, the same length estimate and the same
objective on either path, and therefore the same decision (tests replay a trace through both).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from twinroute.scheduler.api import PickQuery
from twinroute.scheduler.token_cache import (
    DEFAULT_MAX_CHUNKS,
    PrefixTokenCache,
    TokenIds,
    splits_safely,
)

from twinroute.openai_format import ParsedRequest, RequestError
from twinroute.vocabulary import HUB_REPOSITORY_ID

logger = logging.getLogger(__name__)

# A client's own TTFT objective for one request, in seconds.
TTFT_SLO_HEADER: Final = "x-twinroute-ttft-slo-s"
REQUEST_ID_HEADER: Final = "x-request-id"
# Shorter prompts (or uncached rests of prompts) are tokenized inline: under about a
# millisecond, less than the thread hop costs the loop in contention. Longer ones go to a worker
# thread.
TOKENIZE_INLINE_BELOW_CHARS: Final = 2048
# A client's request id is kept for correlation only when it looks like one: never trusted to
# be unique (an engine refuses an id already running) nor safe to log or to put in a header.
_CLIENT_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._~:/-]{1,128}")


class Tokenizer:
    """Token ids for prefix keys from a Hugging Face `tokenizer.json` on disk.

    Prompts go through a `PrefixTokenCache` when the tokenizer keeps its boundary promise (the
    probe at load), so a prefix already seen is not tokenized again; `cache_chunks=0` turns the
    cache off.
    """

    def __init__(self, path: str, *, cache_chunks: int = DEFAULT_MAX_CHUNKS) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tokenizer = HFTokenizer.from_file(path)
        except Exception as error:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(f"tokenizer {path}: not a tokenizer.json ({error})") from error
        # `encode_batch_fast` (tokenizers 0.21+) skips the offsets nobody here reads.
        self._batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        self.cache: PrefixTokenCache | None = None
        if cache_chunks > 0:
            if splits_safely(self._encode_batch):
                self.cache = PrefixTokenCache(self._encode_batch, max_chunks=cache_chunks)
            else:
                logger.warning(
                    "tokenizer %s merges across spaces (its ids change when a text is cut "
                    "before a word); prompts are tokenized whole, with no prefix cache",
                    path,
                )

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> Sequence[int] | TokenIds:
        if self.cache is not None:
            return self.cache.encode(text)
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    async def encode_async(self, text: str, *, offload: bool) -> Sequence[int] | TokenIds:
        """`encode`, with what is left to tokenize on a worker thread when it is long and
        `offload` (the batch call lets go of the GIL while it works; `encode` holds it
        throughout, so a thread would still stall the event loop)."""
        if self.cache is None:
            if offload and len(text) >= TOKENIZE_INLINE_BELOW_CHARS:
                return await asyncio.to_thread(lambda: self._encode_batch([text])[0])
            return self.encode(text)
        lookup = self.cache.lookup(text)
        uncached = len(text) - lookup.cached_chars
        if offload and uncached >= TOKENIZE_INLINE_BELOW_CHARS:
            encoded = await asyncio.to_thread(self.cache.tokenize, lookup)
        else:
            encoded = self.cache.tokenize(lookup)
        return self.cache.complete(lookup, encoded)


class _TokenizerCacheCollector(Collector):
    """The prefix token cache's characters by where their ids came from, as a counter."""

    def __init__(self, cache: PrefixTokenCache, name: str) -> None:
        self._cache = cache
        self._name = name

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self._name,
            "Prompt characters tokenized by the front end, by where their token ids came from "
            "(cached: the prefix token cache; tokenized: the tokenizer).",
            labels=["source"],
        )
        family.add_metric(["cached"], self._cache.cached_chars)
        family.add_metric(["tokenized"], self._cache.tokenized_chars)
        yield family


def register_tokenizer_metrics(
    tokenizer: Tokenizer | None, registry: CollectorRegistry, *, name: str
) -> None:
    """Expose the tokenizer's prefix-cache counts as `name`_total{source}, when it has one."""
    if tokenizer is not None and tokenizer.cache is not None:
        registry.register(_TokenizerCacheCollector(tokenizer.cache, name))


TOKENIZER_FILE: Final = "tokenizer.json"
TOKENIZER_HELP: Final = (
    "a Hugging Face tokenizer.json, a folder holding one (a model snapshot), or a hub "
    "repository id, whose tokenizer.json is fetched once into the hub cache"
)


def tokenizer_file(source: str, *, revision: str | None = None) -> str:
    """The local path of `source`'s `tokenizer.json`: `source` itself when it is a file, the
    one inside it when it is a folder (a model snapshot, a mounted volume), else `source` read
    as a Hugging Face hub repository and the file fetched once into the hub cache, the way vLLM
    fetches its tokenizer (`HF_TOKEN` for gated repositories, `HF_ENDPOINT` for a mirror,
    `HF_HUB_OFFLINE=1` for the cache alone, `HF_HOME` for where it lives). Raises ValueError
    saying what was tried."""
    path = pathlib.Path(source)
    if path.is_file():
        return str(path)
    if path.is_dir():
        inside = path / TOKENIZER_FILE
        if inside.is_file():
            return str(inside)
        raise ValueError(f"tokenizer {source!r}: the folder has no {TOKENIZER_FILE}")
    if not HUB_REPOSITORY_ID.fullmatch(source):
        raise ValueError(f"tokenizer {source!r}: no such file, and not a hub repository id")
    from huggingface_hub import hf_hub_download

    try:
        return str(hf_hub_download(repo_id=source, filename=TOKENIZER_FILE, revision=revision))
    except Exception as error:  # the hub client raises many kinds; all mean "not loaded"
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(
            f"tokenizer {source!r}: no such file, and {TOKENIZER_FILE} could not be fetched "
            f"from the Hugging Face hub{at} ({type(error).__name__}: {error})"
        ) from error


def add_tokenizer_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, help: str
) -> None:
    """`--tokenizer` and its prefix cache's size, the same on every front end."""
    parser.add_argument("--tokenizer", help=help)
    parser.add_argument(
        "--tokenizer-revision", metavar="REV",
        help="with a hub repository as --tokenizer: the branch, tag or commit to fetch",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer-cache-chunks", type=_non_negative_int, default=DEFAULT_MAX_CHUNKS,
        metavar="N",
        help="prompt chunks (about 128 characters each, some 0.6 KB of memory) whose token ids "
        "are kept, so a prefix seen before is not tokenized again; 0 turns the cache off",
    )  # fmt: skip


def tokenizer_from_arguments(args: argparse.Namespace) -> Tokenizer | None:
    if not args.tokenizer:
        return None
    # Batches here are one prompt's chunks: spreading them over Rust worker threads costs about
    # a fifth more CPU than it saves, CPU the engines beside a router would rather have.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = tokenizer_file(args.tokenizer, revision=args.tokenizer_revision)
    return Tokenizer(path, cache_chunks=args.tokenizer_cache_chunks)


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


async def prompt_token_ids(
    parsed: ParsedRequest, tokenizer: Tokenizer | None, *, offload: bool = True
) -> Sequence[int] | TokenIds | None:
    """The prompt's token ids: the client's own, else the local tokenizer's (long prompts on a
    worker thread when `offload`, so they do not stall the event loop), else None (text keys)."""
    if parsed.prompt_token_ids is not None:
        return parsed.prompt_token_ids
    text = parsed.prompt_text
    if tokenizer is None or text is None:
        return None
    return await tokenizer.encode_async(text, offload=offload)


def requested_slo(value: str | None) -> float | None:
    """The client's own TTFT objective (the `x-twinroute-ttft-slo-s` header's value), or None
    when it set none; anything but a positive number of seconds is the client's error."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise RequestError(
            f"header {TTFT_SLO_HEADER} must be a positive number of seconds, got {value!r}"
        )
    return seconds


def tag_request_id(own: str, client_id: str | None) -> str:
    """`own` (unique on this front end), with the client's id appended when it is a sane one."""
    if client_id and _CLIENT_REQUEST_ID.fullmatch(client_id):
        return f"{own}:{client_id}"
    return own


def pick_query(
    parsed: ParsedRequest,
    *,
    request_id: str,
    token_ids: Sequence[int] | TokenIds | None,
    ttft_slo_s: float | None,
    tokens_per_char: float,
    reports_first_token: bool | None = None,
) -> PickQuery:
    """The scheduler's query for a parsed request; `token_ids` are the prompt's (the client's
    own, or a local tokenizer's), None to key the prompt by its text. `reports_first_token`:
    whether the caller will report the first token; None: when the request streams."""
    text = parsed.prompt_text
    return PickQuery(
        request_id=request_id,
        model=parsed.model,
        token_ids=token_ids,
        text=text if token_ids is None else None,
        session_id=parsed.session_id,
        cache_salt=parsed.cache_salt,
        expected_output_tokens=parsed.max_tokens or 0,
        ttft_slo_s=ttft_slo_s,
        # A stream's first chunk is reported (Progress "first_token"); a whole answer is not.
        reports_first_token=parsed.stream if reports_first_token is None else reports_first_token,
        # A completions prompt is what the engine prefills; a chat it renders itself.
        exact_engine_tokens=parsed.kind == "completions" and token_ids is not None,
        prompt_tokens=(
            len(token_ids)
            if token_ids is not None
            else max(1, round(len(text or "") * tokens_per_char))
        ),
    )

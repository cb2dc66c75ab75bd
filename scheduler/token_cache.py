"""Token ids of prompt prefixes already seen, so a prompt is tokenized only past what repeats.

Serving traffic repeats itself at the front: a system prompt shared by every request, a
conversation whose next turn is the last one plus a reply and a question. Tokenizing a
1,400-token prompt costs about half a millisecond of the router's CPU, most of its work per
request, and nearly all of it recomputes ids the router already computed for an earlier request.

The text is cut into chunks at *safe boundaries*: every `chunk_chars` characters or so, just before
a space that is followed by a character that is not whitespace (`" word"`). Tokenizers whose
pre-tokenizer splits text into pieces there (byte-level BPE as in GPT-2, Llama 3, Qwen; Metaspace
with splitting) never merge across such a boundary, so a prompt's ids are the concatenation of its
chunks' ids, and a chunk's ids depend only on its own text. Chunks are kept in a trie: an entry is
found by its parent entry and its own text (a dict key compared exactly, so no hash collision can
hand back another prompt's ids), and a prompt walks the trie from its first chunk until the first
chunk never seen; only the rest is tokenized (one batch call), and its complete chunks are added.
A prompt whose first chunk was never seen is tokenized whole and not cut (cutting costs about a
fifth more tokenizer work); it is cut and remembered when its first chunk comes again.

After its last full chunk a text is cut in quarter chunks: prompts that share all but a short
ending (a system prompt and a question) then share their text up to the last quarter-chunk
boundary before the ending instead of the last full chunk, and a new ending costs the tokenizer
at most a quarter chunk of shared text (on the router bench's 1,405-token prompt, 43 -> 27 us a
prompt, `benchmarks/hot_path/tail-chunks/`). An ending long enough to reach the next full
boundary is still tokenized from the last full chunk they share.

Whether a tokenizer keeps the boundary promise is not assumed: `splits_safely` tokenizes a set of
probe texts both ways at load, with a boundary at every space, and the cache is used only when the
two agree on every probe (a tokenizer that prepends a marker to every call, as Llama 2's does,
fails the probe and is called whole every time).

Memory is bounded by `max_chunks` entries (about 0.6 KB each with the default chunk size), evicted
least recently used; a hit refreshes its path from the deepest chunk to the root, so a parent is
always fresher than its children and eviction takes leaves first (a parent evicted before its
children would strand them).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

TokenIds = npt.NDArray[np.uint32]
# Tokenizes each text on its own, with no special tokens: `["a b", " c"] -> [[ids], [ids]]`.
BatchEncoder = Callable[[list[str]], Sequence[Sequence[int]]]

DEFAULT_CHUNK_CHARS: Final = 128
# The text after its last full chunk is cut every `chunk_chars // TAIL_DIVISOR` characters.
TAIL_DIVISOR: Final = 4
DEFAULT_MAX_CHUNKS: Final = 32_768
_ROOT: Final = 0
_EMPTY: Final[TokenIds] = np.zeros(0, dtype=np.uint32)

# Texts that break a careless split: runs of spaces, tabs and newlines before words, digits,
# contractions, punctuation glued to words, code indentation, non-Latin scripts and emoji.
PROBE_TEXTS: Final = (
    "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
    "a  b   c    d\te\t\tf\n g\n\n  h \n\ti",
    "def f(x):\n    return x  +  1  # comment\n\n\nclass  A:\n\tpass",
    "numbers 1 22 333 4444 55555 3.14159 -7 +8 1,000,000 0x1F",
    "punctuation: (parens) [brackets] {braces} 'quotes' \"double\" -- dashes ... ellipsis !?",
    "They'll we've I'm you'd she's don't  'tis o'clock",
    "unicode: naïve café 東京 タワー 서울 Москва 🚀 🤖 emoji  and  spaces",
    " leading space and trailing space ",
    "  two leading spaces,\r\nwindows line\r\n ends",
)


@dataclass(frozen=True, slots=True)
class _Chunk:
    number: int  # this entry's id in the trie: the parent key of its children
    ids: TokenIds


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the trie holds of one text, and the pieces left to tokenize."""

    text: str
    cached_chars: int
    cached_ids: list[TokenIds]  # chunk by chunk
    path: list[tuple[int, str]]  # the trie keys of the cached chunks, root first
    parent: int  # the trie entry the first new chunk hangs from
    bounds: list[int]  # safe boundaries after `cached_chars`
    pieces: list[str]  # text[cached_chars:] cut at `bounds`; empty when all of it is cached


def safe_boundaries(text: str, *, start: int, every: int) -> list[int]:
    """Positions in `text` after `start`, at least `every` characters apart, each just before a
    space that a non-whitespace character follows."""
    bounds: list[int] = []
    length = len(text)
    find = text.find
    position = start + every
    while True:
        space = find(" ", position)
        if space < 0 or space + 1 >= length:
            return bounds
        if text[space + 1].isspace():
            position = space + 1
            continue
        bounds.append(space)
        position = space + every


def splits_safely(encode_batch: BatchEncoder, probes: Sequence[str] = PROBE_TEXTS) -> bool:
    """True when cutting each probe at every safe boundary and tokenizing the pieces gives the
    same ids as tokenizing it whole."""
    for text in probes:
        cuts = [0, *safe_boundaries(text, start=0, every=1), len(text)]
        pieces = [text[begin:end] for begin, end in itertools.pairwise(cuts)]
        whole, *parts = encode_batch([text, *pieces])
        if [int(i) for i in whole] != [int(i) for part in parts for i in part]:
            return False
    return True


class PrefixTokenCache:
    """Tokenizes prompts, reusing the ids of chunks earlier prompts began with.

    Not thread-safe: `lookup` and `complete` belong to one thread (the event loop's);
    `tokenize`, between them, may run on a worker thread.
    """

    def __init__(
        self,
        encode_batch: BatchEncoder,
        *,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
    ) -> None:
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
        self._encode_batch = encode_batch
        self._chunk_chars = chunk_chars
        self._tail_chars = max(1, chunk_chars // TAIL_DIVISOR)
        self._max_chunks = max_chunks
        self._chunks: OrderedDict[tuple[int, str], _Chunk] = OrderedDict()
        # First chunks seen once: a prompt is cut into chunks only when its first chunk comes
        # back (or continues a cached path), so traffic that shares nothing costs one whole
        # tokenizer call per prompt, as with no cache at all.
        self._seen_once: OrderedDict[str, None] = OrderedDict()
        self._numbers = itertools.count(_ROOT + 1)
        self.cached_chars = 0  # characters whose ids came from the trie, since start
        self.tokenized_chars = 0  # characters tokenized afresh, since start

    def __len__(self) -> int:
        return len(self._chunks)

    def encode(self, text: str) -> TokenIds:
        """`text`'s token ids, as the tokenizer gives them for the whole text."""
        lookup = self.lookup(text)
        return self.complete(lookup, self.tokenize(lookup))

    def lookup(self, text: str) -> Lookup:
        """Walk the trie along `text`'s chunks until the first one never seen."""
        cached_ids: list[TokenIds] = []
        path: list[tuple[int, str]] = []
        parent, begin = _ROOT, 0
        bounds = safe_boundaries(text, start=0, every=self._chunk_chars)
        # After the last full chunk, quarter chunks (module docstring).
        bounds += safe_boundaries(text, start=bounds[-1] if bounds else 0, every=self._tail_chars)
        for index, end in enumerate(bounds):
            key = (parent, text[begin:end])
            chunk = self._chunks.get(key)
            if chunk is None:
                bounds = bounds[index:]
                break
            path.append(key)
            cached_ids.append(chunk.ids)
            parent, begin = chunk.number, end
        else:
            bounds = []
        if not path and bounds and not self._seen_before(text[: bounds[0]]):
            bounds = []  # tokenized whole, remembered only if it comes back
        cuts = [begin, *bounds, len(text)]
        pieces = [text[start:end] for start, end in itertools.pairwise(cuts)]
        if pieces == [""]:
            pieces = []
        return Lookup(text, begin, cached_ids, path, parent, bounds, pieces)

    def _seen_before(self, first_chunk: str) -> bool:
        if first_chunk in self._seen_once:
            del self._seen_once[first_chunk]
            return True
        self._seen_once[first_chunk] = None
        if len(self._seen_once) > self._max_chunks:
            self._seen_once.popitem(last=False)
        return False

    def tokenize(self, lookup: Lookup) -> list[TokenIds]:
        """The ids of each piece the trie lacks; touches no state, so a worker thread may run
        it while the event loop goes on."""
        if not lookup.pieces:
            return []
        return [np.asarray(ids, dtype=np.uint32) for ids in self._encode_batch(lookup.pieces)]

    def complete(self, lookup: Lookup, encoded: list[TokenIds]) -> TokenIds:
        """Remember the new complete chunks and return the whole text's ids."""
        self.cached_chars += lookup.cached_chars
        self.tokenized_chars += len(lookup.text) - lookup.cached_chars
        path = list(lookup.path)
        parent, start = lookup.parent, lookup.cached_chars
        # Only pieces that end at a boundary are complete chunks: the last may still grow.
        for end, ids in zip(lookup.bounds, encoded, strict=False):
            key = (parent, lookup.text[start:end])
            chunk = self._chunks.setdefault(key, _Chunk(number=next(self._numbers), ids=ids))
            path.append(key)
            parent, start = chunk.number, end
        for key in reversed(path):  # deepest first, so the root ends up the freshest
            if key in self._chunks:  # (evicted while the rest was being tokenized)
                self._chunks.move_to_end(key)
        while len(self._chunks) > self._max_chunks:
            self._chunks.popitem(last=False)
        parts = [*lookup.cached_ids, *encoded]
        if not parts:
            return _EMPTY
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

"""A deterministic word-level tokenizer, stable across processes.

A token is a run of non-space characters together with the whitespace before it, so the
tokens of a text concatenate back to the text, and a text that extends another tokenizes to a
token list that extends the other's (up to the last word): prefix caching sees real prefixes.
A token's id is a 31-bit xxhash of its text, so every engine process gives the same ids for the
same text without sharing a vocabulary. Detokenizing knows the pieces this process has seen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import xxhash

_PIECE = re.compile(r"\s*\S+|\s+$")
_ID_MASK = 0x7FFF_FFFF
UNKNOWN_PIECE = "<unk>"
# Bounds the id -> text map so a long-running server cannot grow without limit.
_MAX_REMEMBERED = 1_000_000


class WordTokenizer:
    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}

    def pieces(self, text: str) -> list[str]:
        return _PIECE.findall(text)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        remember = len(self._pieces) < _MAX_REMEMBERED
        for piece in _PIECE.findall(text):
            token = piece_id(piece)
            if remember:
                self._pieces.setdefault(token, piece)
            ids.append(token)
        return ids

    def decode(self, token_ids: Iterable[int]) -> str:
        return "".join(self._pieces.get(t, UNKNOWN_PIECE) for t in token_ids)

    def remember(self, pieces: Sequence[str]) -> None:
        for piece in pieces:
            self._pieces.setdefault(piece_id(piece), piece)


def piece_id(piece: str) -> int:
    return xxhash.xxh32_intdigest(piece.encode()) & _ID_MASK

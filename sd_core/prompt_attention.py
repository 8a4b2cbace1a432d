"""A1111 attention weights ``(x:1.2)``, ``[x]``, escapes and ``BREAK``: one plain text -> weighted fragments.

The second stage of the prompt syntax (``prompt_syntax.parse_prompt``): a hand-written scanner, linear in the text;
no regular expressions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidRequest, quote

ROUND = 1.1  # (text) multiplies by this, [text] divides by it


@dataclass(frozen=True)
class Fragment:
    """A piece of prompt text with its attention weight; ``brk`` marks a BREAK (start a new 75-token chunk)."""

    text: str
    weight: float = 1.0
    brk: bool = False


BREAK = Fragment("", 1.0, True)
Conditioning = tuple[Fragment, ...]


def parse_attention(text: str) -> Conditioning:
    """A1111's attention syntax: ``(a)`` x1.1, ``(a:1.5)``, ``[a]`` /1.1, nesting multiplies, ``\\(`` etc. literal;
    an unclosed ``(``/``[`` still weights everything after it, a stray ``)``/``]`` is literal; ``BREAK`` (its own
    uppercase word) starts a new chunk. Adjacent fragments of equal weight are merged."""
    import numpy as np

    res: list[tuple[str, bool]] = []  # (text, is BREAK); weights from ``ops``
    round_open: list[int] = []
    square_open: list[int] = []
    ops: list[tuple[int, int, float]] = []  # A1111's range multiplications, applied in order at the end

    def multiply(start: int, factor: float) -> None:
        ops.append((start, len(res), factor))

    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "\\":
            if i + 1 < n and text[i + 1] in "()[]\\":
                res.append((text[i + 1], False))
                i += 2
            else:  # a lone backslash is dropped, as A1111 does
                res.append(("", False))
                i += 1
        elif char == "(":
            round_open.append(len(res))
            i += 1
        elif char == "[":
            square_open.append(len(res))
            i += 1
        elif char == ":":
            end, weight = _weight_close(text, i)
            if weight is not None and round_open:
                multiply(round_open.pop(), _float(weight))
                i = end
            else:
                # A1111 keeps the whole ``:1.2)`` as text when no ( is open; otherwise the ``:`` alone
                literal = text[i:end] if weight is not None else ":"
                res.append((literal, False))
                i += len(literal)
        elif char == ")" and round_open:
            multiply(round_open.pop(), ROUND)
            i += 1
        elif char == "]" and square_open:
            multiply(square_open.pop(), 1 / ROUND)
            i += 1
        elif char in ")]":
            res.append((char, False))
            i += 1
        else:
            j = i
            while j < n and text[j] not in "\\()[]:":
                j += 1
            _split_breaks(text[i:j], res)
            i = j
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, 1 / ROUND)
    weights = np.ones(len(res))
    for start, end, factor in ops:  # float64 products in A1111's order: the same floats as its in-place loop
        weights[start:end] *= factor
    merged: list[Fragment] = []
    for (piece, brk), weight in zip(res, weights.tolist(), strict=True):
        if brk:
            merged.append(BREAK)
        elif merged and not merged[-1].brk and merged[-1].weight == weight:
            merged[-1] = Fragment(merged[-1].text + piece, weight)
        else:
            merged.append(Fragment(piece, weight))
    return tuple(merged) or (Fragment(""),)


def _weight_close(text: str, i: int) -> tuple[int, str | None]:
    """At a ``:``: A1111's ``:\\s*([+-]?[.\\d]+)\\s*\\)``; (end of the match, the number) or (i + 1, None)."""
    n = len(text)
    j = i + 1
    while j < n and text[j].isspace():
        j += 1
    start = j
    if j < n and text[j] in "+-":
        j += 1
    digits = j
    while j < n and (text[j] == "." or text[j].isdecimal()):
        j += 1
    if j == digits:
        return i + 1, None
    number = text[start:j]
    while j < n and text[j].isspace():
        j += 1
    if j < n and text[j] == ")":
        return j + 1, number
    return i + 1, None


def _float(number: str) -> float:
    try:
        value = float(number)
    except ValueError:
        raise InvalidRequest(f"attention weight {quote(number)} is not a number", field="prompt") from None
    if not math.isfinite(value):
        raise InvalidRequest(f"attention weight {quote(number)} is not a finite number", field="prompt")
    return value


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _split_breaks(text: str, res: list[tuple[str, bool]]) -> None:
    """Plain text with A1111's ``\\s*\\bBREAK\\b\\s*`` separators as BREAK markers."""
    start = search = 0
    while True:
        at = text.find("BREAK", search)
        if at < 0:
            break
        end = at + 5
        if (at > 0 and _is_word(text[at - 1])) or (end < len(text) and _is_word(text[end])):
            search = at + 1
            continue
        left, right = at, end
        while left > start and text[left - 1].isspace():
            left -= 1
        while right < len(text) and text[right].isspace():
            right += 1
        res.append((text[start:left], False))
        res.append(("", True))
        start = search = right
    res.append((text[start:], False))

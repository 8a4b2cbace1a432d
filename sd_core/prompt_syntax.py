"""A1111 prompt syntax: attention weights ``(x:1.2)``, ``BREAK``, prompt editing ``[a:b:when]`` and ``[a|b]``.

Two stages, as A1111 runs them: prompt editing and alternation turn the prompt into one plain text per step range
(``parse_prompt``), then each text becomes weighted fragments (``parse_attention``). Hand-written scanners, linear in
the prompt (a memo makes every bracket construct parse at most once); no regular expressions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidRequest, quote

ROUND = 1.1  # (text) multiplies by this, [text] divides by it
SYNTAX_CHARS = frozenset("()[]\\")
MAX_NESTING = 32  # bracket constructs nested deeper are read as literal brackets by the editing stage


@dataclass(frozen=True)
class Fragment:
    """A piece of prompt text with its attention weight; ``brk`` marks a BREAK (start a new 75-token chunk)."""

    text: str
    weight: float = 1.0
    brk: bool = False


BREAK = Fragment("", 1.0, True)
Conditioning = tuple[Fragment, ...]


@dataclass(frozen=True)
class PromptSchedule:
    """A prompt over the steps: its distinct conditionings and the (first, last) 0-based steps each applies to."""

    conditionings: tuple[Conditioning, ...]
    ranges: tuple[tuple[int, int, int], ...]  # (first step, last step, index into conditionings), in step order

    @property
    def edited(self) -> bool:
        """Whether the conditioning changes during sampling (prompt editing or alternation)."""
        return len(self.ranges) > 1

    def index_at(self, step: int) -> int:
        """The conditioning used at 0-based ``step`` (steps past the end use the last)."""
        for _first, last, index in self.ranges:
            if step <= last:
                return index
        return self.ranges[-1][2]


def has_syntax(text: str) -> bool:
    """Whether ``text`` may use any syntax at all (brackets, escapes, BREAK); False means it is plain text."""
    return "BREAK" in text or any(char in SYNTAX_CHARS for char in text)


def parse_prompt(text: str, steps: int) -> PromptSchedule:
    """The whole syntax: ``text`` over ``steps`` sampling steps as distinct weighted conditionings and step ranges."""
    texts: list[str] = []
    ranges: list[tuple[int, int, int]] = []
    for first, last, step_text in edit_schedule(text, steps):
        if step_text not in texts:
            texts.append(step_text)
        ranges.append((first, last, texts.index(step_text)))
    return PromptSchedule(tuple(parse_attention(t) for t in texts), tuple(ranges))


# --- stage 1: prompt editing and alternation -------------------------------------------------------------------


@dataclass
class _Scheduled:
    before: list | None
    after: list
    when: str


@dataclass
class _Alternate:
    options: list[list]


class _Unparsable(Exception):
    """The prompt is outside A1111's editing grammar (a ``|`` outside ``[...]``, a trailing ``\\``): no editing."""


class _EditParser:
    """Recursive descent over A1111's editing grammar; at the top level a bracket that opens no valid construct is
    literal text (``start: (prompt | /[][():]/+)*``), inside a construct it makes the construct fail."""

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[object, int] | None] = {}

    def top(self) -> list:
        items: list = []
        pos, n = 0, len(self.text)
        while pos < n:
            part, pos = self.sequence(pos, 0)
            items.extend(part)
            if pos >= n:
                break
            char = self.text[pos]
            if char == "|" or char == "\\":
                raise _Unparsable
            items.append(char)  # a stray bracket or colon: literal
            pos += 1
        return items

    def sequence(self, pos: int, depth: int) -> tuple[list, int]:
        """Plain text and constructs from ``pos`` up to a ``] ) : |``, the end, or a construct that fails."""
        text, n = self.text, len(self.text)
        items: list = []
        start = pos
        while pos < n:
            char = text[pos]
            if char == "\\":
                if pos + 1 >= n:
                    break
                pos += 2
                continue
            if char in "]):|":
                break
            if char in "([":
                got = self.construct(pos, depth + 1)
                if got is None:
                    break
                if pos > start:
                    items.append(text[start:pos])
                node, pos = got
                items.append(node)
                start = pos
                continue
            pos += 1
        if pos > start:
            items.append(text[start:pos])
        return items, pos

    def construct(self, pos: int, depth: int) -> tuple[object, int] | None:
        if pos in self.memo:
            return self.memo[pos]
        result = None if depth > MAX_NESTING else self._construct(pos, depth)
        self.memo[pos] = result
        return result

    def _construct(self, pos: int, depth: int) -> tuple[object, int] | None:
        text, n = self.text, len(self.text)
        opening = text[pos]
        first, p = self.sequence(pos + 1, depth)
        at = text[p] if p < n else ""
        if opening == "(":
            if at == ")":
                return ["(", first, ")"], p + 1
            if at == ":":
                second, q = self.sequence(p + 1, depth)
                if q < n and text[q] == ")":
                    return ["(", first, ":", second, ")"], q + 1
            return None
        if at == "]":
            return ["[", first, "]"], p + 1
        if at == "|":
            options = [first]
            while p < n and text[p] == "|":
                option, p = self.sequence(p + 1, depth)
                options.append(option)
            if p < n and text[p] == "]":
                return _Alternate(options), p + 1
            return None
        if at == ":":
            second, q = self.sequence(p + 1, depth)
            if q < n and text[q] == "]":  # [to:when]
                when = _number(second)
                return (_Scheduled(None, first, when), q + 1) if when is not None else None
            if q < n and text[q] == ":":  # [from:to:when]
                third, r = self.sequence(q + 1, depth)
                when = _number(third)
                if r < n and text[r] == "]" and when is not None:
                    return _Scheduled(first, second, when), r + 1
        return None


def _number(items: list) -> str | None:
    """The text of lark's SIGNED_NUMBER, with optional whitespace around it, or None."""
    if len(items) != 1 or not isinstance(items[0], str):
        return None
    s = items[0].strip()
    i, n = 0, len(s)
    if i < n and s[i] in "+-":
        i += 1
    digits = i
    while i < n and s[i] in "0123456789":
        i += 1
    whole = i > digits
    fraction = False
    if i < n and s[i] == ".":
        i += 1
        start = i
        while i < n and s[i] in "0123456789":
            i += 1
        fraction = i > start
    if not (whole or fraction):
        return None
    if i < n and s[i] in "eE":
        i += 1
        if i < n and s[i] in "+-":
            i += 1
        start = i
        while i < n and s[i] in "0123456789":
            i += 1
        if i == start:
            return None
    return s if i == n else None


def _when(number: str, steps: int) -> int:
    """A1111's switch step: a number with a dot is a fraction of the steps, else a step number; at most ``steps``."""
    value = float(number)
    if "." in number:
        value *= steps
    if value >= steps:
        return steps
    return -1 if value <= -1 else int(value)


def _flatten(items, step: int, steps: int, out: list[str]) -> None:
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Scheduled):
            _flatten((item.before or []) if step <= _when(item.when, steps) else item.after, step, steps, out)
        elif isinstance(item, _Alternate):
            _flatten(item.options[(step - 1) % len(item.options)], step, steps, out)
        else:
            _flatten(item, step, steps, out)


def _switch_steps(items, steps: int, found: set[int]) -> bool:
    """Adds every scheduled switch step (>= 1) to ``found``; True when an alternation is present."""
    alternates = False
    for item in items:
        if isinstance(item, _Scheduled):
            when = _when(item.when, steps)
            if when >= 1:
                found.add(when)
            alternates |= _switch_steps(item.before or [], steps, found)
            alternates |= _switch_steps(item.after, steps, found)
        elif isinstance(item, _Alternate):
            alternates = True
            for option in item.options:
                _switch_steps(option, steps, found)
        elif isinstance(item, list):
            alternates |= _switch_steps(item, steps, found)
    return alternates


def edit_schedule(text: str, steps: int) -> list[tuple[int, int, str]]:
    """Prompt editing and alternation: (first, last 0-based step, text) per range; consecutive equal texts merged.

    As A1111: ``[from:to:when]`` uses ``from`` up to step ``when`` (1-based, so ``from`` runs ``when`` + 1 sampling
    steps, A1111's own count), ``[a|b]`` switches every step (the first option runs two steps). A prompt outside the
    grammar (a ``|`` outside brackets, a trailing backslash) is one text, as A1111 falls back.
    """
    if "[" not in text or not (":" in text or "|" in text):
        return [(0, steps - 1, text)]
    try:
        items = _EditParser(text).top()
    except _Unparsable:
        return [(0, steps - 1, text)]
    ends = {steps}
    if _switch_steps(items, steps, ends):
        ends.update(range(1, steps + 1))
    out: list[tuple[int, int, str]] = []
    first = 0
    for end in sorted(ends):
        last = min(end, steps - 1)
        if last < first:
            continue
        parts: list[str] = []
        _flatten(items, end, steps, parts)
        step_text = "".join(parts)
        if out and out[-1][2] == step_text:
            out[-1] = (out[-1][0], last, step_text)
        else:
            out.append((first, last, step_text))
        first = last + 1
    return out


# --- stage 2: attention weights and BREAK ----------------------------------------------------------------------


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

"""A1111 prompt editing ``[from:to:when]`` and alternation ``[a|b]``: one prompt -> one plain text per step range.

The first stage of the prompt syntax (``prompt_syntax.parse_prompt``): a hand-written recursive descent over A1111's
editing grammar, linear in the prompt (a memo makes every bracket construct parse at most once); no regular expressions.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_NESTING = 32  # bracket constructs nested deeper are read as literal brackets by the editing stage


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

"""A1111 prompt syntax: attention weights ``(x:1.2)``, ``BREAK``, prompt editing ``[a:b:when]`` and ``[a|b]``.

Two stages, as A1111 runs them: prompt editing and alternation turn the prompt into one plain text per step range
(``prompt_editing.edit_schedule``), then each text becomes weighted fragments (``prompt_attention.parse_attention``).
Hand-written scanners, linear in the prompt; no regular expressions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompt_attention import Conditioning, parse_attention
from .prompt_editing import edit_schedule

SYNTAX_CHARS = frozenset("()[]\\")


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

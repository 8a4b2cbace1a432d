"""The A1111 prompt syntax parser (sd_core.prompt_syntax, prompt_editing, prompt_attention): attention weights,
escapes, unbalanced brackets, BREAK, prompt editing and alternation, as A1111 reads them; and that hostile prompts
parse."""

import pytest

from sd_core.errors import InvalidRequest
from sd_core.prompt_attention import BREAK, Fragment, parse_attention
from sd_core.prompt_editing import edit_schedule
from sd_core.prompt_syntax import has_syntax, parse_prompt


def weights(text: str) -> list[tuple[str, float]]:
    return [("BREAK", -1.0) if f.brk else (f.text, round(f.weight, 6)) for f in parse_attention(text)]


@pytest.mark.parametrize(("text", "expected"), [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("a (cat) dog", [("a ", 1.0), ("cat", 1.1), (" dog", 1.0)]),
    ("((cat))", [("cat", 1.21)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("(cat: 0.25 )", [("cat", 0.25)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("[cat]", [("cat", round(1 / 1.1, 6))]),
    ("[[cat]]", [("cat", round(1 / 1.21, 6))]),
    ("((cat:1.5) dog)", [("cat", 1.65), (" dog", 1.1)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("(cat:1.0) dog", [("cat dog", 1.0)]),  # weight 1 merges back into plain text
    # escapes: literal brackets and backslash; a lone backslash is dropped (A1111)
    (r"\(cat\) \[dog\]", [("(cat) [dog]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"a \n b", [("a n b", 1.0)]),
    (r"(\(x\))", [("(x)", 1.1)]),
    # unbalanced: an unclosed bracket weights the rest, a stray closing one is literal
    ("a (cat dog", [("a ", 1.0), ("cat dog", 1.1)]),
    ("a [cat", [("a ", 1.0), ("cat", round(1 / 1.1, 6))]),
    ("a ) b ] c", [("a ) b ] c", 1.0)]),
    ("cat:1.2) dog", [("cat:1.2) dog", 1.0)]),  # a weight with no ( open stays text
    ("(a:b)", [("a:b", 1.1)]),  # not a number: the colon is text
    ("a: b", [("a: b", 1.0)]),
    # BREAK: its own uppercase word only, whitespace around it dropped
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAKING break aBREAK", [("BREAKING break aBREAK", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),  # A1111 would weight the BREAK away (see docs)
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
])
def test_attention(text, expected):
    assert weights(text) == expected


def test_break_fragment_and_plain_detection():
    assert parse_attention("x BREAK y")[1] == BREAK
    assert not has_syntax("a photo of a cat, best quality: 8k | nice")
    assert has_syntax("a (cat)") and has_syntax("a BREAK b") and has_syntax(r"a \ b") and has_syntax("[a]")


def test_bad_weight_is_refused():
    with pytest.raises(InvalidRequest) as caught:
        parse_attention("(cat:1.2.3)")
    assert str(caught.value) == "prompt: attention weight '1.2.3' is not a number"


@pytest.mark.parametrize(("text", "steps", "expected"), [
    ("a cat", 4, [(0, 3, "a cat")]),
    # [from:to:when]: a fraction (has a dot) of the steps, or a step number; `from` runs through step `when`
    ("a [cat:dog:0.5]", 4, [(0, 2, "a cat"), (3, 3, "a dog")]),
    ("a [cat:dog:2]", 4, [(0, 2, "a cat"), (3, 3, "a dog")]),
    ("a [cat:dog:1]", 10, [(0, 1, "a cat"), (2, 9, "a dog")]),
    ("a [cat:dog:0.25]", 10, [(0, 2, "a cat"), (3, 9, "a dog")]),  # int(2.5) = 2
    ("a [cat:dog:0]", 4, [(0, 3, "a dog")]),
    ("a [cat:dog:1.0]", 4, [(0, 3, "a cat")]),  # 1.0 = all the steps
    ("a [cat:dog:9]", 4, [(0, 3, "a cat")]),
    ("a [dog:2]", 4, [(0, 2, "a "), (3, 3, "a dog")]),  # [to:when]: added after `when`
    ("a [cat::2]", 4, [(0, 2, "a cat"), (3, 3, "a ")]),  # [from::when]: removed after `when`
    ("[cat:dog: 2 ]", 4, [(0, 2, "cat"), (3, 3, "dog")]),
    # alternation: every step (the first option twice at the start, A1111's count)
    ("[cat|dog]", 5, [(0, 1, "cat"), (2, 2, "dog"), (3, 3, "cat"), (4, 4, "dog")]),
    ("[a|b|c]", 4, [(0, 1, "a"), (2, 2, "b"), (3, 3, "c")]),
    ("[a|]", 3, [(0, 1, "a"), (2, 2, "")]),
    # nesting: editing inside weights, weights inside editing, editing inside alternation
    ("([cat:dog:1]:1.2)", 4, [(0, 1, "(cat:1.2)"), (2, 3, "(dog:1.2)")]),
    ("[(cat:1.2):dog:1]", 4, [(0, 1, "(cat:1.2)"), (2, 3, "dog")]),
    ("[[a:b:1]|c]", 4, [(0, 1, "a"), (2, 2, "c"), (3, 3, "b")]),
    # not editing: no number, unbalanced, or outside A1111's grammar (a | outside brackets, a trailing backslash)
    ("[cat:dog]", 4, [(0, 3, "[cat:dog]")]),
    ("[cat:dog:x]", 4, [(0, 3, "[cat:dog:x]")]),
    ("[a (b:c:1]", 4, [(0, 3, "[a (b:c:1]")]),
    ("( [cat:dog:1]", 4, [(0, 1, "( cat"), (2, 3, "( dog")]),  # a stray ( stays, the editing still works
    ("a | [cat:dog:1]", 4, [(0, 3, "a | [cat:dog:1]")]),
    ("[cat:dog:1] \\", 4, [(0, 3, "[cat:dog:1] \\")]),
    (r"\[cat:dog:1\]", 4, [(0, 3, r"\[cat:dog:1\]")]),
])
def test_edit_schedule(text, steps, expected):
    assert edit_schedule(text, steps) == expected


def test_schedule_keeps_distinct_conditionings_only():
    schedule = parse_prompt("[cat|dog] (x:1.5)", 6)
    assert len(schedule.conditionings) == 2
    assert schedule.conditionings[0] == (Fragment("cat "), Fragment("x", 1.5))
    assert [schedule.index_at(step) for step in range(6)] == [0, 0, 1, 0, 1, 0]
    assert schedule.edited
    plain = parse_prompt("(cat:1.2)", 6)
    assert not plain.edited and plain.ranges == ((0, 5, 0),)


@pytest.mark.parametrize("text", ["[" * 10000, "(x " * 3333, "[a:" * 3333, "[a|" * 3333, "(a)" * 3333,
                                  "[a:b:" + "(" * 9990, "[" * 5000 + "]" * 5000, "[a:b:1]" * 1400, "\\" * 9999])
def test_hostile_prompts_parse(text):
    """Deep or unbalanced brackets at the schema's 10000-character limit: no recursion error, one conditioning per
    distinct text (the scanners are linear; no timing asserted here)."""
    schedule = parse_prompt(text, 150)
    assert 1 <= len(schedule.conditionings) <= 2


def test_editing_that_multiplies_the_prompt_too_much_is_refused():
    from sd_core.prompt_encoding import plan_prompts

    many = "[a|b][c|d|e][f|g|h|i|j] " + "x" * 9000  # ~20 distinct texts over 20 steps, 9000+ characters each
    with pytest.raises(InvalidRequest) as caught:
        plan_prompts("a cat", many, 20)
    assert str(caught.value).startswith("negative_prompt: prompt editing / alternation make ")
    assert plan_prompts("[cat|dog] " + "x" * 9000, "", 20).prompt.edited  # two texts: fine

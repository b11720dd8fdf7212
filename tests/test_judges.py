"""Tests for align.evaluation.judges: the format constraints, the other rule judges and load_judge."""

from __future__ import annotations

import itertools
import sys
import textwrap

import pytest

from align.evaluation.judges import (
    FORMAT_CONSTRAINTS,
    FormatJudge,
    FunctionJudge,
    Judge,
    JudgeSpecError,
    LengthJudge,
    RefusalJudge,
    available_judges,
    find_format_instructions,
    load_judge,
    register_judge,
    render_instruction,
    requested_item_count,
)
from align.core.errors import ConfigError


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def fmt(prompt_text: str, response: str) -> float | None:
    return FormatJudge().score([user(prompt_text)], [response])[0]


def all_phrasings(key: str, n: int = 5) -> list[str]:
    c = FORMAT_CONSTRAINTS[key]
    return [c.render(i, n if c.takes_number else None) for i in range(len(c.phrasings))]


QUESTION = "What is the capital of France?"
LIST_QUESTION = "Name three fruits."

# key -> (question, responses that comply, responses that violate)
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "only_answer": (
        QUESTION,
        ["Paris", "  Paris\n", "New Delhi", "black and white", "12"],
        ["The capital of France is Paris.", "Paris.", "It is Paris.", "Answer: Paris", "Paris is the capital",
         "Paris!", "Paris\nFrance", ""],
    ),
    "lowercase": (
        QUESTION,
        ["the capital of france is paris.", "paris", "  paris!  ", "7 plus 5 equals 12."],
        ["The capital of France is Paris.", "the capital of France is paris.", "12", "...", "", "   "],
    ),
    "uppercase": (
        QUESTION,
        ["THE CAPITAL OF FRANCE IS PARIS.", "PARIS", "7 PLUS 5 EQUALS 12."],
        ["The Capital Of France Is Paris.", "The capital of France is PARIS.", "PARIs", "12", ""],
    ),
    "prefix": (
        QUESTION,
        ["Answer: The capital of France is Paris.", "Answer: Paris", "Answer:Paris", "  Answer: Paris"],
        ["answer: Paris", "The answer: Paris", "Paris. Answer: Paris", "Answer:", "Answer:   ", "ANSWER: Paris",
         "Answer Paris", ""],
    ),
    "exclamation": (
        QUESTION,
        ["The capital of France is Paris!", "Paris!", "Paris!!", "Paris!  \n"],
        ["The capital of France is Paris.", "Great question! The capital of France is Paris.", "!", "!!!",
         "Paris! Hope that helps.", ""],
    ),
    "quotes": (
        QUESTION,
        ['"The capital of France is Paris."', '"Paris"', '  "Paris"\n'],
        ["The capital of France is Paris.", 'The capital of France is "Paris".', "'Paris'", '"Paris', 'Paris"',
         '""', '"   "', '"', ""],
    ),
    "bullets": (
        LIST_QUESTION,
        ["- apple\n- banana\n- cherry", "- apple\n\n- banana\n- cherry\n", "- North America\n- Asia\n- Europe"],
        ["apple, banana, cherry", "1. apple\n2. banana\n3. cherry", "* apple\n* banana\n* cherry",
         "- apple\n- banana", "- apple\n- banana\n- cherry\n- grape",
         "Here are three fruits:\n- apple\n- banana\n- cherry",
         "- apple\n-banana\n- cherry", "- apple\n- \n- cherry", "-", ""],
    ),
    "max_words": (  # rendered with n=5 below
        QUESTION,
        ["Paris", "The capital is Paris.", "The capital of France: Paris"],
        ["The capital of France is Paris.", "one two three four five six", "", "   "],
    ),
}


def test_cases_cover_every_constraint():
    assert set(CASES) == set(FORMAT_CONSTRAINTS)


@pytest.mark.parametrize("key", sorted(FORMAT_CONSTRAINTS))
def test_constraint_compliant_and_violating(key):
    question, good, bad = CASES[key]
    for instruction in all_phrasings(key, n=5):
        prompt = f"{question} {instruction}"
        for response in good:
            assert fmt(prompt, response) == 1.0, (prompt, response)
        for response in bad:
            assert fmt(prompt, response) == 0.0, (prompt, response)


@pytest.mark.parametrize("key", sorted(FORMAT_CONSTRAINTS))
def test_empty_response_fails_every_phrasing(key):
    question = LIST_QUESTION if key == "bullets" else QUESTION
    for instruction in all_phrasings(key):
        for empty in ("", " ", "\n\t "):
            assert fmt(f"{question} {instruction}", empty) == 0.0


@pytest.mark.parametrize(
    "prompt",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name three fruits."}],
        [{"role": "user", "content": "Write a poem about capital letters."}],
        [{"role": "user", "content": ""}],
        [{"role": "system", "content": "Reply with only the answer."}],  # no user turn
        [],
    ],
)
def test_unrelated_prompts_give_none(prompt):
    assert FormatJudge().score([prompt], ["Paris"]) == [None]
    assert FormatJudge().score([prompt], [""]) == [None]


def test_only_the_last_user_message_counts():
    prompt = [
        {"role": "user", "content": "What is 2 plus 2? Reply with only the answer."},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 plus 3?"},
    ]
    assert FormatJudge().score([prompt], ["3 plus 3 equals 6."]) == [None]
    prompt[-1]["content"] = "And 3 plus 3? Write your reply in capital letters only."
    prompt.append({"role": "assistant", "content": ""})  # a trailing assistant stub is ignored
    assert FormatJudge().score([prompt], ["3 PLUS 3 EQUALS 6."]) == [1.0]


def test_matching_ignores_case_and_whitespace():
    assert fmt("What is 2 plus 2?  reply WITH only\nthe answer.", "4") == 1.0
    assert fmt("What is 2 plus 2?  reply WITH only\nthe answer.", "2 plus 2 equals 4.") == 0.0
    assert fmt("Reply with only the answer. What is 2 plus 2?", "4") == 1.0  # position does not matter


def test_several_instructions_must_all_hold():
    prompt = (
        "What is the capital of France? Write your reply in capital letters only. "
        "End your reply with an exclamation mark."
    )
    assert fmt(prompt, "THE CAPITAL OF FRANCE IS PARIS!") == 1.0
    assert fmt(prompt, "THE CAPITAL OF FRANCE IS PARIS.") == 0.0
    assert fmt(prompt, "The capital of France is Paris!") == 0.0


def test_max_words_reads_the_number():
    for n in (1, 3, 12):
        for instruction in all_phrasings("max_words", n=n):
            prompt = f"{QUESTION} {instruction}"
            assert fmt(prompt, " ".join(["w"] * n)) == 1.0
            assert fmt(prompt, " ".join(["w"] * (n + 1))) == 0.0
    matches, _ = find_format_instructions("Use no more than 17 words.")
    assert [(m.constraint.key, m.n) for m in matches] == [("max_words", 17)]


def test_bullets_count_follows_the_question():
    for question, n in [("Name two colors.", 2), ("List 4 planets.", 4), ("Give me five drinks.", 5),
                        ("Name three days of the week.", 3)]:  # fmt: skip
        for instruction in all_phrasings("bullets"):
            prompt = f"{question} {instruction}"
            assert fmt(prompt, "\n".join(f"- item{i}" for i in range(n))) == 1.0
            assert fmt(prompt, "\n".join(f"- item{i}" for i in range(n + 1))) == 0.0
            assert fmt(prompt, "\n".join(f"- item{i}" for i in range(n - 1))) == 0.0
    # No number asked: any non-empty bullet list passes.
    assert fmt("What do bees make? Answer as a bulleted list.", "- honey\n- wax") == 1.0
    assert fmt("What do bees make? Answer as a bulleted list.", "honey and wax") == 0.0


def test_requested_item_count():
    assert requested_item_count("Name three fruits.") == 3
    assert requested_item_count("list 12 things") == 12
    assert requested_item_count("Give me two colors.") == 2
    assert requested_item_count("What is 3 plus 4?") is None
    assert requested_item_count("What is the capital of France?") is None


def test_find_format_instructions_returns_the_bare_question():
    matches, question = find_format_instructions("Name three fruits. Answer as a bulleted list.")
    assert [m.constraint.key for m in matches] == ["bullets"]
    assert question == "Name three fruits."


def test_phrasing_table_is_unambiguous():
    phrasings = [(c.key, p) for c in FORMAT_CONSTRAINTS.values() for p in c.phrasings]
    assert len(phrasings) >= 14
    for c in FORMAT_CONSTRAINTS.values():
        assert len(c.phrasings) >= 2, c.key
        assert c.applies_to in ("any", "list", "single")
        assert all(("{n}" in p) == c.takes_number for p in c.phrasings), c.key
    for (k1, p1), (k2, p2) in itertools.permutations(phrasings, 2):
        assert p1.lower().format(n=7) not in p2.lower().format(n=7), (p1, p2)
    # Each rendered phrasing is recognized as exactly its own constraint and phrasing.
    for c in FORMAT_CONSTRAINTS.values():
        for i in range(len(c.phrasings)):
            text = c.render(i, 7 if c.takes_number else None)
            matches, rest = find_format_instructions(text)
            assert [(m.constraint.key, m.phrasing_index) for m in matches] == [(c.key, i)], text
            assert rest == ""


def test_render_instruction():
    assert render_instruction("prefix") == "Begin your reply with 'Answer:'."
    assert render_instruction("max_words", 0, n=3) == "Answer in at most 3 words."
    with pytest.raises(ValueError, match="positive n"):
        render_instruction("max_words")
    with pytest.raises(ValueError, match="unknown format constraint 'nope'"):
        render_instruction("nope")


def test_string_prompt_and_none_response_are_accepted():
    judge = FormatJudge()
    assert judge.score(["What is 2 plus 2? Reply with only the answer."], ["4"]) == [1.0]
    assert judge.score([user("What is 2 plus 2? Reply with only the answer.")], [None]) == [0.0]


def test_score_checks_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        FormatJudge().score([user("a"), user("b")], ["x"])


def test_refusal_judge():
    judge = RefusalJudge()
    refusals = ["I can't help with that.", "I\u2019m sorry, but I cannot do that.", "As an AI, I must decline.",
                "Sorry, but no.", "  I WILL NOT do that.", "I am unable to assist with this request."]  # fmt: skip
    others = ["The capital of France is Paris.", "", "Paris", "Sure! Here it is."]
    prompts = [user("anything")] * (len(refusals) + len(others))
    assert judge.score(prompts, refusals + others) == [1.0] * len(refusals) + [0.0] * len(others)
    late = "Paris is the capital. " * 20 + "I can't say more."
    assert judge.score([user("q")], [late]) == [0.0]  # past the window
    assert RefusalJudge(phrases=["nope"]).score([user("q")], ["Nope."]) == [1.0]


def test_length_judge():
    judge = LengthJudge(max_words=3)
    assert judge.score([user("q")] * 4, ["one", "one two three", "one two three four", "  "]) == [1.0, 1.0, 0.0, 0.0]
    assert LengthJudge().max_words == 50
    with pytest.raises(ValueError):
        LengthJudge(max_words=0)


# --------------------------------------------------------------------------- load_judge


def shout_judge(prompt, response):
    """A module-level judge function used through `load_judge(f"{__name__}:shout_judge")`."""
    if not prompt:
        return None
    return 1.0 if response.isupper() else 0.0


NOT_CALLABLE = 42
JUDGE_OBJECT = LengthJudge(max_words=2)


def test_load_builtins():
    assert available_judges() == ["format", "length", "refusal"]
    assert isinstance(load_judge("format"), FormatJudge)
    assert isinstance(load_judge(" refusal "), RefusalJudge)
    length = load_judge("length", max_words=7)
    assert isinstance(length, LengthJudge) and length.max_words == 7
    for name in available_judges():
        judge = load_judge(name)
        assert isinstance(judge, Judge)
        assert judge.name == name


def test_load_module_function_from_this_module():
    judge = load_judge(f"{__name__}:shout_judge")
    assert isinstance(judge, FunctionJudge) and isinstance(judge, Judge)
    assert judge.name == f"{__name__}:shout_judge"
    assert judge.score([user("q"), user("q"), []], ["HI", "hi", "HI"]) == [1.0, 0.0, None]


def test_load_module_function_from_tmp_module(tmp_path, monkeypatch):
    (tmp_path / "my_tmp_judges.py").write_text(
        textwrap.dedent(
            """
            def contains_paris(prompt, response):
                return int("paris" in response.lower())

            def bad(prompt, response):
                return "yes"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = load_judge("my_tmp_judges:contains_paris")
    assert judge.score([user("q")] * 2, ["Paris", "Rome"]) == [1.0, 0.0]
    assert all(type(x) is float for x in judge.score([user("q")], ["Paris"]))
    with pytest.raises(TypeError, match="expected a float or None"):
        load_judge("my_tmp_judges:bad").score([user("q")], ["x"])
    sys.modules.pop("my_tmp_judges", None)


def test_load_judge_object():
    assert load_judge(f"{__name__}:JUDGE_OBJECT") is JUDGE_OBJECT


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown judge 'nope': expected one of ['format', 'length', 'refusal'] or 'package.module:function'"),
        ("", "non-empty"),
        ("   ", "non-empty"),
        (":fn", "judge spec ':fn' must look like 'package.module:function'"),
        ("mod:", "judge spec 'mod:' must look like 'package.module:function'"),
        ("no_such_module_xyz:fn", "judge spec 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'"),
        (
            f"{__name__}:missing_fn",
            f"judge spec '{__name__}:missing_fn': module '{__name__}' has no attribute 'missing_fn'",
        ),
        (f"{__name__}:NOT_CALLABLE", f"judge spec '{__name__}:NOT_CALLABLE': {__name__}.NOT_CALLABLE is not callable"),
    ],
)
def test_load_judge_errors(spec, message):
    with pytest.raises(ValueError) as info:
        load_judge(spec)
    assert message in str(info.value)
    assert isinstance(info.value, JudgeSpecError) and isinstance(info.value, ConfigError)


def test_load_judge_rejects_kwargs_for_functions():
    with pytest.raises(ValueError, match="keyword arguments"):
        load_judge(f"{__name__}:shout_judge", max_words=3)


def test_register_judge():
    register_judge("short3", lambda: LengthJudge(max_words=3))
    try:
        assert load_judge("short3").score([user("q")], ["a b c d"]) == [0.0]
        assert "short3" in available_judges()
    finally:
        from align.evaluation import judges

        judges._BUILTIN_JUDGES.pop("short3")
    with pytest.raises(ValueError):
        register_judge("a:b", LengthJudge)

"""The format instructions the format judge checks: each constraint's phrasings, how its instruction is
found in a user message, and how a response is checked against it.

`FORMAT_CONSTRAINTS` is the one table: the bundled demo datasets (data_tools/demo_data.py) write their
instructions from it and the format judge (align/evaluation/judges.py, which exports it) reads them
back with it, so generator and judge cannot drift apart. Pure Python, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}  # fmt: skip

# "Name three fruits.", "List 4 planets.", "Give me two colors." -> the number of items asked for.
_ITEM_COUNT_RE = re.compile(
    r"\b(?:name|list|give(?:\s+me)?|write(?:\s+down)?|tell\s+me|mention|suggest)\s+"
    r"(?:exactly\s+)?(\d+|" + "|".join(_NUMBER_WORDS) + r")\b",
    re.IGNORECASE,
)


def requested_item_count(question: str) -> int | None:
    """The number of items a list question asks for ("Name three fruits." -> 3), else ``None``."""
    match = _ITEM_COUNT_RE.search(question)
    if match is None:
        return None
    token = match.group(1).lower()
    return int(token) if token.isdigit() else _NUMBER_WORDS[token]


def _has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def _check_only_answer(response: str, question: str, n: int | None) -> bool:
    # The bare answer: 1-3 words on one line, not a sentence (no closing . ! ?) and no label
    # ("Answer: Paris" is not the bare answer).
    words = response.split()
    return (
        1 <= len(words) <= 3
        and "\n" not in response
        and ":" not in response
        and not response.endswith((".", "!", "?"))
    )


def _check_lowercase(response: str, question: str, n: int | None) -> bool:
    return _has_letters(response) and not any(ch.isupper() for ch in response)


def _check_uppercase(response: str, question: str, n: int | None) -> bool:
    return _has_letters(response) and not any(ch.islower() for ch in response)


ANSWER_PREFIX = "Answer:"


def _check_prefix(response: str, question: str, n: int | None) -> bool:
    return response.startswith(ANSWER_PREFIX) and bool(response[len(ANSWER_PREFIX) :].strip())


def _check_exclamation(response: str, question: str, n: int | None) -> bool:
    return response.endswith("!") and any(ch.isalnum() for ch in response)


def _check_quotes(response: str, question: str, n: int | None) -> bool:
    return len(response) >= 2 and response[0] == '"' and response[-1] == '"' and bool(response[1:-1].strip())


BULLET = "- "


def _check_bullets(response: str, question: str, n: int | None) -> bool:
    lines = [line.rstrip() for line in response.splitlines() if line.strip()]
    if not lines or not all(line.startswith(BULLET) and line[len(BULLET) :].strip() for line in lines):
        return False
    wanted = requested_item_count(question)
    return wanted is None or len(lines) == wanted


def _check_max_words(response: str, question: str, n: int | None) -> bool:
    assert n is not None  # the phrasing always carries the number
    return 1 <= len(response.split()) <= n


@dataclass(frozen=True)
class FormatConstraint:
    """One kind of format instruction: its fixed phrasings and the check of a response.

    ``phrasings`` are exact sentences appended to a question; a ``{n}`` placeholder stands for
    a positive integer (then ``takes_number`` is true). ``check(response, question, n)`` gets
    the stripped response, the user message with the instruction removed, and that integer.
    ``applies_to`` says which questions the instruction is meant for: ``"any"``, ``"list"`` (list
    questions such as "Name three fruits.") or ``"single"`` (questions with one short answer).
    The judge checks whatever it finds; this only guides which prompts a generator builds.
    """

    key: str
    description: str
    phrasings: tuple[str, ...]
    check: Callable[[str, str, int | None], bool]
    applies_to: Literal["any", "list", "single"] = "any"

    @property
    def takes_number(self) -> bool:
        return "{n}" in self.phrasings[0]

    def render(self, phrasing_index: int = 0, n: int | None = None) -> str:
        """The instruction text for one phrasing (``n`` fills ``{n}``)."""
        text = self.phrasings[phrasing_index]
        if self.takes_number:
            if n is None or n < 1:
                raise ValueError(f"format constraint {self.key!r} needs a positive n, got {n!r}")
            return text.format(n=n)
        return text

    def is_satisfied(self, response: str, question: str = "", n: int | None = None) -> bool:
        """Whether ``response`` (stripped here) obeys this instruction; empty responses never do."""
        response = response.strip()
        return bool(response) and self.check(response, question, n)


# The single table of format instructions. Each phrasing is recognized verbatim (case and
# runs of whitespace ignored) anywhere in the last user message. No phrasing may contain
# another one; tests/test_judges.py checks that. Add phrasings at the END of a tuple so the
# demo generator's choices for existing seeds stay put.
FORMAT_CONSTRAINTS: dict[str, FormatConstraint] = {
    c.key: c
    for c in (
        FormatConstraint(
            key="only_answer",
            description="only the bare answer: 1-3 words on one line, no sentence punctuation at the end, no label",
            phrasings=(
                "Reply with only the answer.",
                "Give only the answer, not a full sentence.",
                "Respond with just the answer and nothing else.",
            ),
            check=_check_only_answer,
            applies_to="single",
        ),
        FormatConstraint(
            key="lowercase",
            description="contains letters and no uppercase letter",
            phrasings=(
                "Write your reply in lowercase letters only.",
                "Use only lowercase letters in your reply.",
                "Do not use any capital letters.",
            ),
            check=_check_lowercase,
        ),
        FormatConstraint(
            key="uppercase",
            description="contains letters and no lowercase letter",
            phrasings=(
                "Write your reply in capital letters only.",
                "Use only uppercase letters in your reply.",
                "Answer in all caps.",
            ),
            check=_check_uppercase,
        ),
        FormatConstraint(
            key="prefix",
            description="starts with 'Answer:' (case-sensitive) followed by some text",
            phrasings=(
                "Begin your reply with 'Answer:'.",
                "Start your reply with 'Answer:'.",
                "Your reply must start with 'Answer:'.",
            ),
            check=_check_prefix,
        ),
        FormatConstraint(
            key="exclamation",
            description="ends with '!' (and has some letters or digits)",
            phrasings=(
                "End your reply with an exclamation mark.",
                "Finish your reply with an exclamation mark.",
                "Your reply must end with an exclamation mark.",
            ),
            check=_check_exclamation,
        ),
        FormatConstraint(
            key="quotes",
            description='starts and ends with a double quote (") with non-blank text between',
            phrasings=(
                "Wrap your whole reply in double quotes.",
                "Put your entire reply inside double quotes.",
                "Enclose your reply in double quotation marks.",
            ),
            check=_check_quotes,
        ),
        FormatConstraint(
            key="bullets",
            description=(
                "every non-blank line starts with '- ' followed by text; if the question asks for a "
                "number of items ('Name three ...'), exactly that many lines"
            ),
            phrasings=(
                "Answer as a bulleted list.",
                "Format your reply as a bulleted list with one item per line.",
                "Reply with a list where each line starts with '- '.",
            ),
            check=_check_bullets,
            applies_to="list",
        ),
        FormatConstraint(
            key="max_words",
            description="between 1 and n whitespace-separated words",
            phrasings=(
                "Answer in at most {n} words.",
                "Use no more than {n} words.",
                "Keep your reply to {n} words or fewer.",
            ),
            check=_check_max_words,
        ),
    )
}


def render_instruction(key: str, phrasing_index: int = 0, n: int | None = None) -> str:
    """The text of format instruction ``key`` in phrasing ``phrasing_index`` (``n`` for ``{n}``)."""
    try:
        constraint = FORMAT_CONSTRAINTS[key]
    except KeyError:
        raise ValueError(f"unknown format constraint {key!r}; known: {sorted(FORMAT_CONSTRAINTS)}") from None
    return constraint.render(phrasing_index, n)


def _phrasing_regex(phrasing: str) -> re.Pattern[str]:
    parts = []
    for piece in re.split(r"(\{n\}|\s+)", phrasing):
        if piece == "{n}":
            parts.append(r"(\d+)")
        elif piece and piece.isspace():
            parts.append(r"\s+")
        elif piece:
            parts.append(re.escape(piece))
    return re.compile("".join(parts), re.IGNORECASE)


_PHRASING_PATTERNS: tuple[tuple[FormatConstraint, int, re.Pattern[str]], ...] = tuple(
    (constraint, index, _phrasing_regex(phrasing))
    for constraint in FORMAT_CONSTRAINTS.values()
    for index, phrasing in enumerate(constraint.phrasings)
)


@dataclass(frozen=True)
class InstructionMatch:
    """A format instruction found in a message: which constraint, phrasing, number and where."""

    constraint: FormatConstraint
    phrasing_index: int
    n: int | None
    start: int
    end: int


def find_format_instructions(text: str) -> tuple[list[InstructionMatch], str]:
    """Find every known format instruction in ``text``.

    Returns the matches (in order of position) and the remaining text with the instructions
    cut out (the bare question, used e.g. to read "Name three ..." for the bullets check).
    """
    matches: list[InstructionMatch] = []
    for constraint, index, pattern in _PHRASING_PATTERNS:
        for m in pattern.finditer(text):
            n = int(m.group(1)) if constraint.takes_number else None
            matches.append(InstructionMatch(constraint, index, n, m.start(), m.end()))
    matches.sort(key=lambda m: (m.start, m.end))
    question, cursor = [], 0
    for m in matches:
        question.append(text[cursor : m.start])
        cursor = max(cursor, m.end)
    question.append(text[cursor:])
    return matches, " ".join("".join(question).split())



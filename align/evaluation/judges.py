"""Rule-based judges: score a model's responses to chat prompts, without a model.

Interface
---------
A judge is any object with

* ``name: str`` -- a short identifier used in logs and metric names, and
* ``score(prompts, responses) -> list[float | None]`` -- batched scoring. ``prompts[i]``
  is a conversation (a list of ``{"role": ..., "content": ...}`` messages, the last one
  normally the user turn being answered) and ``responses[i]`` is the generated reply.
  The result has one entry per pair: a float (higher is better; every built-in judge
  returns 0.0 or 1.0) or ``None`` where the judge does not apply to that prompt. Callers
  average over the non-``None`` entries and report how many applied.

`Judge` is a `typing.Protocol`, so a judge needs no base class; `RuleJudge` is a small
base class for judges that score one pair at a time.

Built-in judges (see `load_judge`)
----------------------------------
* ``"format"`` -- `FormatJudge`: finds a format instruction (one of the fixed phrasings
  in `FORMAT_CONSTRAINTS`) in the last user message and checks the response obeys it:
  1.0 obeyed, 0.0 not, ``None`` if the prompt carries no recognized instruction. The
  bundled demo datasets (``data_tools/demo_data.py``) import their phrasings from the
  same table, so generator and judge cannot drift apart.
* ``"refusal"`` -- `RefusalJudge`: 1.0 if the response reads as a refusal (one of
  `REFUSAL_PHRASES` near its start), else 0.0. Applies to every prompt.
* ``"length"`` -- `LengthJudge`: 1.0 if the response has between 1 and ``max_words``
  (default 50) whitespace-separated words, else 0.0. Applies to every prompt.

`AnswerJudge` (verifiable answers: 1.0 if the response contains the reference answer of its
question, else 0.0) needs the references, so it is built directly,
``AnswerJudge(answers={question: answer})``, not by name (``align-data generate --judge answer``
builds it from the prompts file).

``load_judge("rm:<run dir>")`` resolves through a factory registered with
`register_judge_prefix`: the reward-model judge, registered by the `align.evaluation` package.

``load_judge("package.module:function")`` wraps any function
``(prompt: list[dict], response: str) -> float | None`` into a judge.

This module is pure Python on purpose (no torch / transformers): it is imported by
data generation, tests and evaluation alike.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from align.core.errors import ConfigError, DataError

Message = Mapping[str, Any]
Prompt = Sequence[Message]

__all__ = [
    "AnswerJudge",
    "FORMAT_CONSTRAINTS",
    "REFUSAL_PHRASES",
    "FormatConstraint",
    "FormatJudge",
    "FunctionJudge",
    "InstructionMatch",
    "Judge",
    "JudgeSpecError",
    "LengthJudge",
    "RefusalJudge",
    "RuleJudge",
    "available_judges",
    "build_judge",
    "find_format_instructions",
    "last_user_message",
    "load_judge",
    "register_judge",
    "register_judge_prefix",
    "check_judge_spec",
    "check_judge_specs",
    "render_instruction",
    "requested_item_count",
]


class JudgeSpecError(ConfigError, ValueError):
    """A judge spec names no built-in judge, or its ``module:function`` cannot be loaded.

    A `ValueError` (for plain-Python callers) and an `align.core.errors.ConfigError` (so recipes
    print its one-line message instead of a traceback).
    """


# --------------------------------------------------------------------------- interface


@runtime_checkable
class Judge(Protocol):
    """What every judge provides: a ``name`` and a batched ``score``."""

    name: str

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float | None]:
        """Score ``responses[i]`` as a reply to ``prompts[i]``; ``None`` where not applicable."""
        ...


class RuleJudge:
    """Base class for judges that score each (prompt, response) pair independently.

    Subclasses set ``name`` and implement `score_one`.
    """

    name: str = "rule"

    def score_one(self, prompt: Prompt, response: str) -> float | None:
        """Score one response; ``None`` if the judge does not apply to this prompt."""
        raise NotImplementedError

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float | None]:
        """Score each pair with `score_one`; the two sequences must have the same length."""
        if len(prompts) != len(responses):
            raise ValueError(
                f"judge {self.name!r}: got {len(prompts)} prompts but {len(responses)} responses"
            )
        return [self.score_one(_as_messages(p), "" if r is None else str(r)) for p, r in zip(prompts, responses)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _as_messages(prompt: Prompt | str) -> Prompt:
    """Accept a bare string as a single user message (a convenience for callers and tests)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


def last_user_message(prompt: Prompt) -> str | None:
    """The content of the last ``user`` message in ``prompt`` (``None`` if there is none)."""
    for message in reversed(list(prompt)):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


# --------------------------------------------------------------------------- format constraints

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


class FormatJudge(RuleJudge):
    """Checks that the response obeys the format instruction(s) in the last user message.

    1.0 if every recognized instruction is obeyed, 0.0 if any is not, ``None`` if the last user
    message carries no instruction from `FORMAT_CONSTRAINTS`. The response is stripped of
    surrounding whitespace first; an empty response fails every instruction.
    """

    name = "format"

    def score_one(self, prompt: Prompt, response: str) -> float | None:
        text = last_user_message(prompt)
        if not text:
            return None
        matches, question = find_format_instructions(text)
        if not matches:
            return None
        ok = all(m.constraint.is_satisfied(response, question, m.n) for m in matches)
        return 1.0 if ok else 0.0


# --------------------------------------------------------------------------- other rule judges

# Lowercase, straight apostrophes. Matched as substrings of the response's first
# `RefusalJudge.window` characters, so "I can't believe it!" deep inside an answer does not count.
REFUSAL_PHRASES: tuple[str, ...] = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm sorry",
    "i am sorry",
    "sorry, but",
    "i apologize",
    "i'm unable",
    "i am unable",
    "i'm not able to",
    "i am not able to",
    "i must decline",
    "i'm not comfortable",
    "i am not comfortable",
    "as an ai",
    "i'm not allowed",
    "i am not allowed",
    "cannot help with",
    "can't help with",
    "cannot assist",
    "can't assist",
    "unable to help",
    "unable to assist",
)


class RefusalJudge(RuleJudge):
    """1.0 if the response looks like a refusal, else 0.0 (applies to every prompt).

    A refusal is one of ``phrases`` (lowercase) within the first ``window`` characters of the
    lowercased response, with curly apostrophes straightened. Empty responses score 0.0.
    """

    name = "refusal"

    def __init__(self, phrases: Sequence[str] = REFUSAL_PHRASES, window: int = 200) -> None:
        self.phrases = tuple(p.lower() for p in phrases)
        self.window = window

    def score_one(self, prompt: Prompt, response: str) -> float | None:
        head = response.strip().lower().replace("\u2019", "'").replace("\u2018", "'")[: self.window]
        return 1.0 if any(p in head for p in self.phrases) else 0.0


class LengthJudge(RuleJudge):
    """1.0 if the response has 1 to ``max_words`` whitespace-separated words, else 0.0.

    Applies to every prompt. A cheap "stays concise" check; ``max_words`` defaults to 50.
    """

    name = "length"

    def __init__(self, max_words: int = 50) -> None:
        if max_words < 1:
            raise ValueError(f"LengthJudge: max_words must be >= 1, got {max_words}")
        self.max_words = max_words

    def score_one(self, prompt: Prompt, response: str) -> float | None:
        return 1.0 if 1 <= len(response.split()) <= self.max_words else 0.0


def _answer_words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class AnswerJudge(RuleJudge):
    """Verifiable answers: 1.0 if the response contains a reference answer, else 0.0.

    ``answers`` maps a question (the text of the last user message, stripped) to its reference
    answer or answers. Matching ignores case and punctuation: the answer's words must appear
    consecutively in the response ("The capital is Paris." contains "paris"). ``None`` for a
    prompt without a reference.
    """

    name = "answer"

    def __init__(self, answers: Mapping[str, str | Sequence[str]] | None = None) -> None:
        if not answers:
            raise JudgeSpecError("judge 'answer' needs reference answers: answers={question: answer, ...}")
        self.answers: dict[str, list[list[str]]] = {}
        for question, refs in answers.items():
            refs = [refs] if isinstance(refs, str) else list(refs)
            words = [w for w in (_answer_words(r) for r in refs) if w]
            if words:
                self.answers[question.strip()] = words

    def score_one(self, prompt: Prompt, response: str) -> float | None:
        question = last_user_message(prompt)
        refs = self.answers.get(question.strip()) if question else None
        if refs is None:
            return None
        said = _answer_words(response)
        for ref in refs:
            n = len(ref)
            if any(said[i : i + n] == ref for i in range(len(said) - n + 1)):
                return 1.0
        return 0.0


class FunctionJudge(RuleJudge):
    """Wraps ``fn(prompt: list[dict], response: str) -> float | None`` into a judge."""

    def __init__(self, fn: Callable[[Prompt, str], float | None], name: str) -> None:
        self.fn = fn
        self.name = name

    def score_one(self, prompt: Prompt, response: str) -> float | None:
        value = self.fn(prompt, response)
        if value is None:
            return None
        if isinstance(value, str) or not hasattr(value, "__float__"):  # ints, bools, numpy/torch scalars pass
            raise TypeError(
                f"judge {self.name!r} returned {type(value).__name__} {value!r}; expected a float or None"
            )
        return float(value)


# --------------------------------------------------------------------------- loading

_BUILTIN_JUDGES: dict[str, Callable[..., Judge]] = {
    "format": FormatJudge,
    "refusal": RefusalJudge,
    "length": LengthJudge,
}
# "prefix:argument" specs resolved by a registered factory, e.g. "rm:runs/demo/reward" for a
# reward-model judge (registered by align.evaluation; the factory needs torch, this module does not).
# Each prefix has a factory and an optional cheap check of the argument (loads no model).
_JUDGE_PREFIXES: dict[str, tuple[Callable[..., Judge], Callable[[str], None] | None]] = {}


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    """Make ``load_judge(name)`` return ``factory(**kwargs)``; ``name`` may not contain ':'."""
    if not name or ":" in name:
        raise ValueError(f"judge name {name!r} must be non-empty and contain no ':'")
    _BUILTIN_JUDGES[name] = factory


def register_judge_prefix(prefix: str, factory: Callable[..., Judge], check: Callable[[str], None] | None = None) -> None:
    """Make ``load_judge("prefix:arg", **kw)`` return ``factory(arg, **kw)`` (e.g. ``rm`` for reward models).

    ``check(arg)``, when given, validates the argument cheaply for `check_judge_spec` (raising
    `JudgeSpecError`); without it a spec with this prefix passes the check.
    """
    if not prefix or ":" in prefix or not prefix.isidentifier():
        raise ValueError(f"judge prefix {prefix!r} must be an identifier without ':'")
    _JUDGE_PREFIXES[prefix] = (factory, check)


def available_judges() -> list[str]:
    """Names accepted by `load_judge` besides ``module:function`` specs."""
    return sorted(_BUILTIN_JUDGES)


def check_judge_spec(spec: str) -> None:
    """Fail early, and cheaply, on a spec `load_judge` could not resolve (loads no model)."""
    if not isinstance(spec, str) or not spec.strip():
        raise JudgeSpecError(f"judge spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    prefix, sep, arg = spec.partition(":")
    if spec in _BUILTIN_JUDGES:
        return
    if sep and prefix in _JUDGE_PREFIXES:
        _, check = _JUDGE_PREFIXES[prefix]
        if check is not None:
            check(arg)
        return
    load_judge(spec)  # rule judges and module:function are cheap to build


def check_judge_specs(key: str, specs: Sequence[str | None]) -> None:
    """`check_judge_spec` for the specs of one config key; the error names the key."""
    for spec in specs:
        if spec is None:
            continue
        try:
            check_judge_spec(spec)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def load_judge(spec: str, **kwargs: Any) -> Judge:
    """Build a judge from a spec.

    * a built-in name (``"format"``, ``"refusal"``, ``"length"``, or one added with
      `register_judge`); ``kwargs`` go to its constructor, e.g. ``load_judge("length", max_words=20)``;
    * ``"package.module:attr"`` where ``attr`` is a function ``(prompt, response) -> float | None``
      (wrapped in a `FunctionJudge` named after the spec), or an object that already is a `Judge`.

    Raises `JudgeSpecError` (a `ValueError`) naming the spec when it cannot be resolved.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise JudgeSpecError(f"judge spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in _BUILTIN_JUDGES:
        return _BUILTIN_JUDGES[spec](**kwargs)

    # Registered prefixes ("rm:<reward RunDir>") come before the "module:function" form.
    prefix, sep, arg = spec.partition(":")
    if sep and prefix in _JUDGE_PREFIXES:
        factory, _ = _JUDGE_PREFIXES[prefix]
        return factory(arg, **kwargs)

    if ":" not in spec:
        raise JudgeSpecError(
            f"unknown judge {spec!r}: expected one of {available_judges()} or 'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise JudgeSpecError(f"judge spec {spec!r} must look like 'package.module:function'")
    if kwargs:
        raise JudgeSpecError(f"judge spec {spec!r}: keyword arguments are only accepted by built-in judges")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while importing the module
        raise JudgeSpecError(
            f"judge spec {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise JudgeSpecError(f"judge spec {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, Judge) and not isinstance(obj, type):
        return obj
    if not callable(obj):
        raise JudgeSpecError(
            f"judge spec {spec!r}: {module_name}.{attr} is not callable (a {type(obj).__name__}); "
            "expected a function (prompt, response) -> float | None"
        )
    return FunctionJudge(obj, name=spec)


def shown_prompt(prompt: Prompt | str) -> str:
    """A prompt's last message, quoted and cut to 80 characters, for an error message."""
    messages = _as_messages(prompt)
    text = " ".join(str(messages[-1].get("content", "")).split()) if messages else ""
    return repr(text if len(text) <= 80 else text[:77] + "...")


def check_finite_scores(who: str, scores: Sequence[float | None], prompts: Sequence[Prompt], hint: str = "") -> None:
    """A judge's scores are finite numbers or None ("does not apply"): a NaN or inf is an error naming the judge
    (`who`) and a prompt it returned one for, never a silent "does not apply" or a NaN mean."""
    for score, prompt in zip(scores, prompts):
        if score is not None and not math.isfinite(float(score)):
            raise DataError(f"{who} returned {float(score)} for the prompt {shown_prompt(prompt)}; a judge returns a finite "
                            f"number, or None where it does not apply{hint}")


ANSWER = "answer"  # the verifiable-answer judge: its references come from the data, not the spec


def build_judge(spec: str, kwargs: Mapping[str, Any] | None = None, answers: Mapping[str, Any] | None = None, where: str = "judge") -> Judge:
    """`load_judge`, plus ``"answer"``: an `AnswerJudge` over ``answers`` ({question: answer or answers}).

    ``where`` names the option in errors (``--judge``, ``rewards[0].judge``). The one place callers
    that read references from their data (``align-data generate``, the online stages) build judges.
    """
    kwargs = dict(kwargs or {})
    if isinstance(spec, str) and spec.strip() == ANSWER:
        if kwargs:
            raise JudgeSpecError(f"{where}: judge 'answer' takes no arguments (its references come from the data's 'answer' field)")
        if not answers:
            raise JudgeSpecError(f"{where}: judge 'answer' needs reference answers: no row of the data has an 'answer' field")
        return AnswerJudge(answers)
    try:
        return load_judge(spec, **kwargs)
    except TypeError as exc:
        raise JudgeSpecError(f"{where}: judge {spec!r} does not take these arguments: {exc}") from None

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
from typing import Any, Protocol, runtime_checkable

from align.core.errors import ConfigError, DataError
from align.evaluation.format_constraints import (  # noqa: F401 - the format judge's table, exported with the judges
    FORMAT_CONSTRAINTS, FormatConstraint, InstructionMatch, find_format_instructions, render_instruction, requested_item_count,
)

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

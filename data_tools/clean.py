"""Cleaning rules. Each pair is checked in this order and dropped for the first rule it breaks,
counted under that rule's key (the report lists them all, including zeros):

  malformed_roles, empty_turn, identical, prompt_too_long, response_too_long, total_too_long,
  contaminated, exact_duplicate, near_duplicate_prompt

Roles: a prompt is an optional system message, then user/assistant turns alternating from user,
ending with a user turn; each response alternates from an assistant turn and ends with one.
Lengths are tokens of `--tokenizer` (message contents, without chat-template markup), or
whitespace-separated words without one. Decontamination drops pairs any of whose texts contain
a word n-gram (`--decontam-ngram`, default 13) of an evaluation prompt; evaluation prompts of
5 to n-1 words are matched whole.

Unpaired builds (`--kind unpaired`, KTO rows) check each response on its own by the same rules
(UNPAIRED_REASONS): a pair whose chosen is identical to its rejected gives no rows, the length
limits apply to the one response, and instead of exact duplicates a response (same prompt and
completion) is kept once: a later copy with the same label is merged into the first, and a
response labelled both desirable and undesirable is dropped, every copy of it (as align's
`merge_unpaired` does with the responses several pairs share). That last rule needs the whole
input, so the builder applies it after the stream (`Cleaner.settle`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from align.core.errors import DataError
from align.core.pairing import STRUCTURAL_REASONS, structural_problem
from align.core.rows import ROLES, empty_problem, pair_serial, role_problem, same_response, serial  # noqa: F401 (re-exported)
from align.core.rows import response_serial, unpaired_problems
from data_tools.dedup import PromptClusters, U64Map, digest64, words
from data_tools.sources.base import Labeled, Messages, Pair, json_cell

REASONS = {
    **STRUCTURAL_REASONS,
    "prompt_too_long": "prompt over --max-prompt-tokens",
    "response_too_long": "chosen or rejected over --max-response-tokens",
    "total_too_long": "prompt + response over --max-total-tokens",
    "contaminated": "overlaps the evaluation set (--decontaminate)",
    "exact_duplicate": "exact duplicate of an earlier pair",
    "near_duplicate_prompt": "near-duplicate prompt (--near-dup)",
}
UNPAIRED_REASONS = {
    "malformed_roles": REASONS["malformed_roles"],
    "empty_turn": REASONS["empty_turn"],
    "identical": "from a pair whose chosen is identical to its rejected (both responses)",
    "prompt_too_long": REASONS["prompt_too_long"],
    "response_too_long": "response over --max-response-tokens",
    "total_too_long": "prompt + response over --max-total-tokens",
    "contaminated": REASONS["contaminated"],
    "near_duplicate_prompt": REASONS["near_duplicate_prompt"],
    "repeated_response": "repeated response (same prompt and response, same label): kept once",
    "conflicting_label": "response labelled both desirable and undesirable (every copy)",
}
DESIRABLE, UNDESIRABLE = 1, 2  # label bits of a response in the ledger
SHORT_EVAL_MIN_WORDS = 5


# --------------------------------------------------------------------------- row checks
# role_problem, empty_problem and same_response live in align.core.rows: align's recipes apply the
# same checks to the rows they train on.


def prompt_text(prompt: Messages) -> str:
    return "\n".join(m["content"] for m in prompt)


def pair_digest(prompt: Messages, chosen: Messages, rejected: Messages) -> int:
    return digest64(pair_serial(prompt, chosen, rejected))


def prompt_digest(prompt: Messages) -> int:
    return digest64(serial(prompt))


# --------------------------------------------------------------------------- lengths


class Lengths:
    """Text lengths in tokens of a tokenizer, or in words without one."""

    def __init__(self, tokenizer_spec: str | None) -> None:
        self.spec = tokenizer_spec
        self.tokenizer = load_tokenizer(tokenizer_spec) if tokenizer_spec else None
        self.unit = f"tokens ({tokenizer_spec})" if tokenizer_spec else "words"

    def of(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(t.split()) for t in texts]
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def pairs(self, pairs: list[Pair]) -> list[tuple[int, int, int]]:
        """(prompt, chosen, rejected) lengths: the sums over each side's message contents."""
        texts: list[str] = []
        spans = []
        for p in pairs:
            row = []
            for msgs in (p.prompt, p.chosen, p.rejected):
                row.append((len(texts), len(texts) + len(msgs)))
                texts.extend(m["content"] for m in msgs)
            spans.append(row)
        lens = self.of(texts)
        return [tuple(sum(lens[a:b]) for a, b in row) for row in spans]

    def responses(self, rows: list[Labeled]) -> list[tuple[int, int]]:
        """(prompt, completion) lengths of unpaired rows."""
        texts: list[str] = []
        spans = []
        for r in rows:
            spans.append([(len(texts), len(texts) + len(r.prompt)), (len(texts) + len(r.prompt), len(texts) + len(r.prompt) + len(r.completion))])
            texts.extend(m["content"] for m in r.prompt + r.completion)
        lens = self.of(texts)
        return [tuple(sum(lens[a:b]) for a, b in row) for row in spans]


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from align.core.errors import ModelError
    from align.modeling.models import resolve

    ref = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(ref.location, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--tokenizer '{spec}': cannot load a tokenizer from {ref.location}: {str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------- decontamination


class EvalOverlap:
    """Word n-grams of evaluation prompts; `hits(text)` says whether a text contains one."""

    def __init__(self, specs: list[str], n: int) -> None:
        from data_tools.readers import iter_rows

        self.n, self.specs = n, specs
        self.grams: set[str] = set()
        self.short: dict[int, set[str]] = {}
        self.prompts = 0
        for spec in specs:
            for where, row in iter_rows(spec):
                if isinstance(row, Exception):
                    raise DataError(f"--decontaminate: {row}")
                for text in eval_prompts(row, where):
                    self._add(words(text))
                    self.prompts += 1
        if not self.prompts:
            raise DataError(f"--decontaminate {', '.join(specs)}: no evaluation prompts found")

    def _add(self, toks: list[str]) -> None:
        n = self.n
        if len(toks) >= n:
            self.grams.update(" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1))
        elif len(toks) >= SHORT_EVAL_MIN_WORDS:
            self.short.setdefault(len(toks), set()).add(" ".join(toks))

    def hits(self, text: str) -> bool:
        toks = words(text)
        n = self.n
        if len(toks) >= n and any(" ".join(toks[i : i + n]) in self.grams for i in range(len(toks) - n + 1)):
            return True
        for size, seqs in self.short.items():
            if len(toks) >= size and any(" ".join(toks[i : i + size]) in seqs for i in range(len(toks) - size + 1)):
                return True
        return False


def eval_prompts(row: Any, where: str) -> list[str]:
    """The prompt texts of an evaluation row: a preference/SFT row's user (and system) turns,
    or its prompt/question/instruction/input/text field."""
    if not isinstance(row, dict):
        raise DataError(f"--decontaminate: {where}: expected a row object")
    for key in ("prompt", "messages", "chosen"):
        value = json_cell(row.get(key))
        if isinstance(value, list) and key == "prompt" and value and all(isinstance(t, str) for t in value):
            return value  # the turns of a multi-turn prompt (MT-Bench: HuggingFaceH4/mt_bench_prompts)
        if isinstance(value, list):
            return [m["content"] for m in value if isinstance(m, dict) and m.get("role") in ("user", "system") and isinstance(m.get("content"), str)]
        if isinstance(value, str) and key == "prompt":
            return [value]
    for key in ("question", "instruction", "input", "problem", "text"):
        if isinstance(row.get(key), str) and row[key].strip():
            return [row[key]]
    raise DataError(f"--decontaminate: {where}: no prompt found (fields prompt, messages, question, instruction, input, problem or text)")


# --------------------------------------------------------------------------- the cleaner


@dataclass
class CleanOptions:
    near_dup: str = "minhash"
    near_dup_threshold: float = 0.8
    near_dup_ngram: int = 3
    tokenizer: str | None = None
    max_prompt_tokens: int | None = None
    max_response_tokens: int | None = None
    max_total_tokens: int | None = None
    decontaminate: list[str] = field(default_factory=list)
    decontam_ngram: int = 13


@dataclass
class Kept:
    pair: Pair
    lengths: tuple[int, int, int]  # prompt, chosen, rejected
    prompt_digest: int
    prompt_key: str  # normalized prompt text: what the split hashes
    new_prompt: bool  # the first kept pair with this prompt
    cluster: int  # near-duplicate cluster id (-1 with --near-dup off)


@dataclass
class KeptResponse:
    row: Labeled
    lengths: tuple[int, int]  # prompt, completion
    key: int  # digest of (prompt, completion): the response, labels aside
    prompt_digest: int
    prompt_key: str
    cluster: int


class Cleaner:
    """Applies the rules to batches of pairs (or of unpaired rows), in input order; counts drops in
    `self.dropped`."""

    def __init__(self, opts: CleanOptions, unpaired: bool = False) -> None:
        self.opts = opts
        self.reasons = UNPAIRED_REASONS if unpaired else REASONS
        self.dropped: Counter = Counter({k: 0 for k in self.reasons})
        self.labels = U64Map()  # unpaired: response digest -> DESIRABLE | UNDESIRABLE bits seen
        self.lengths = Lengths(opts.tokenizer)
        self.overlap = EvalOverlap(opts.decontaminate, opts.decontam_ngram) if opts.decontaminate else None
        self.seen_pairs = U64Map()
        self.clusters = PromptClusters(method=opts.near_dup, threshold=opts.near_dup_threshold, ngram=opts.near_dup_ngram)

    def _structural(self, p: Pair) -> str | None:
        return structural_problem(p)

    def _length(self, lens: tuple[int, int, int]) -> str | None:
        o = self.opts
        prompt, chosen, rejected = lens
        if o.max_prompt_tokens is not None and prompt > o.max_prompt_tokens:
            return "prompt_too_long"
        if o.max_response_tokens is not None and max(chosen, rejected) > o.max_response_tokens:
            return "response_too_long"
        if o.max_total_tokens is not None and prompt + max(chosen, rejected) > o.max_total_tokens:
            return "total_too_long"
        return None

    def _contaminated(self, p: Pair) -> bool:
        return any(self.overlap.hits(m["content"]) for msgs in (p.prompt, p.chosen, p.rejected) for m in msgs)

    def process(self, pairs: list[Pair]) -> list[Kept]:
        survivors = []
        for p in pairs:
            reason = self._structural(p)
            if reason:
                self.dropped[reason] += 1
            else:
                survivors.append(p)
        lens = self.lengths.pairs(survivors)
        stage2 = []
        for p, ln in zip(survivors, lens):
            reason = self._length(ln) or ("contaminated" if self.overlap and self._contaminated(p) else None)
            if reason:
                self.dropped[reason] += 1
            else:
                stage2.append((p, ln))
        if not stage2:
            return []
        pair_keys = [pair_digest(p.prompt, p.chosen, p.rejected) for p, _ in stage2]
        known = self.seen_pairs.bulk_get(np.asarray(pair_keys, dtype=np.uint64))
        kept_pre = []
        for (p, ln), key, k in zip(stage2, pair_keys, known):
            if self.seen_pairs.get(key, int(k)) >= 0:
                self.dropped["exact_duplicate"] += 1
                continue
            self.seen_pairs.put(key, 1)
            kept_pre.append((p, ln))
        texts = [prompt_text(p.prompt) for p, _ in kept_pre]
        word_lists = [words(t) for t in texts]
        digests = [prompt_digest(p.prompt) for p, _ in kept_pre]
        assigned = self.clusters.assign(digests, word_lists, texts)
        out = []
        for (p, ln), ws, d, (cid, near, new) in zip(kept_pre, word_lists, digests, assigned):
            if near:
                self.dropped["near_duplicate_prompt"] += 1
                self.clusters.count_row(cid)
                continue
            out.append(Kept(p, ln, d, " ".join(ws), new, cid))
        self.seen_pairs.maybe_merge()
        self.clusters.end_batch()
        return out

    # ------------------------------------------------------------------ unpaired rows

    def _ledger(self, keys: list[int]) -> list[int]:
        """Each response digest's ledger value (0 when new): label bits | copies << 2."""
        known = self.labels.bulk_get(np.asarray(keys, dtype=np.uint64))
        return [max(self.labels.recent.get(key, int(k)), 0) for key, k in zip(keys, known)]

    def _record(self, key: int, value: int, was: int) -> None:
        if was and key not in self.labels.recent:  # already folded into the sorted arrays: update in place
            pos = int(np.searchsorted(self.labels.keys, np.uint64(key)))
            self.labels.vals[pos] = value
        else:
            self.labels.put(key, value)

    def process_unpaired(self, rows: list[Labeled]) -> list[KeptResponse]:
        """The first copy of each response that passes every rule; later copies are only counted in the
        ledger, and `settle` decides at the end whether the first copy is written."""
        survivors = []
        for r in rows:
            problems = unpaired_problems({"prompt": r.prompt, "completion": r.completion})
            if problems:
                self.dropped[problems[0][0]] += 1
            else:
                survivors.append(r)
        stage2 = []
        for r, ln in zip(survivors, self.lengths.responses(survivors)):
            reason = self._length((ln[0], ln[1], 0)) or (
                "contaminated" if self.overlap and any(self.overlap.hits(m["content"]) for m in r.prompt + r.completion) else None)
            if reason:
                self.dropped[reason] += 1
            else:
                stage2.append((r, ln))
        if not stage2:
            return []
        texts = [prompt_text(r.prompt) for r, _ in stage2]
        word_lists = [words(t) for t in texts]
        digests = [prompt_digest(r.prompt) for r, _ in stage2]
        assigned = self.clusters.assign(digests, word_lists, texts)
        out = []
        for (r, ln), ws, d, (cid, near, _) in zip(stage2, word_lists, digests, assigned):
            if near:
                self.dropped["near_duplicate_prompt"] += 1
                self.clusters.count_row(cid)
                continue
            key = digest64(response_serial(r.prompt, r.completion))
            was = self._ledger([key])[0]  # one at a time: a batch may hold several copies of a response
            self._record(key, (was | (DESIRABLE if r.label else UNDESIRABLE)) + (1 << 2), was)
            if not was:
                out.append(KeptResponse(r, ln, key, d, " ".join(ws), cid))
        self.labels.maybe_merge()
        self.clusters.end_batch()
        return out

    def settle(self, keys: list[int]) -> list[bool]:
        """After the stream: whether each first copy is written. A response labelled both ways is
        dropped, every copy counted under conflicting_label; otherwise its later copies count as
        repeated_response."""
        keep = []
        for value in self._ledger(keys):
            copies = value >> 2
            if value & 3 == DESIRABLE | UNDESIRABLE:
                self.dropped["conflicting_label"] += copies
                keep.append(False)
            else:
                self.dropped["repeated_response"] += copies - 1
                keep.append(True)
        return keep

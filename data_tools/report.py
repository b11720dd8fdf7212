"""The stats report: markdown plus PNG plots, for a build (with its counts) or any dataset.

Streaming and bounded: lengths go into fixed histograms (exact up to 65,535 tokens, longer ones
in the last bin), score margins into a 100,000-value reservoir (mean, min and max are exact).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align.core.normalize import KTO_WEIGHT_RATIO, kto_weights
from data_tools.clean import REASONS, UNPAIRED_REASONS
from data_tools.dedup import Cluster
from align.core.pairing import OUTCOMES
from data_tools.sources.base import INVALID_REASONS

LEN_BINS = 1 << 16
RESERVOIR = 100_000


@dataclass
class Counts:
    """Where every input row and every pair (or, with kind "unpaired", every response) went."""

    kind: str = "pairs"  # or "unpaired": then dropped / written count responses
    rows_read: int = 0
    invalid: Counter = field(default_factory=Counter)  # reason -> rows skipped (--skip-invalid)
    left_out: Counter = field(default_factory=Counter)  # format-level reason -> count
    pairing: Counter = field(default_factory=Counter)  # pairing.OUTCOMES key -> count
    pairs_formed: int = 0
    dropped: Counter = field(default_factory=lambda: Counter({k: 0 for k in REASONS}))
    written: Counter = field(default_factory=Counter)  # split -> pairs (or unpaired rows)
    responses_formed: int = 0  # unpaired: responses labelled, before cleaning
    labels: dict[str, Counter] = field(default_factory=dict)  # unpaired: split -> desirable / undesirable rows written

    def to_json(self) -> dict:
        out = {
            "rows_read": self.rows_read,
            "invalid_rows": dict(self.invalid),
            "left_out_by_format": dict(self.left_out),
            "pairing": dict(self.pairing),
            "pairs_formed": self.pairs_formed,
        }
        if self.kind == "unpaired":
            return {
                **out,
                "responses_formed": self.responses_formed,
                "responses_dropped": dict(self.dropped),
                "responses_written": dict(self.written),
                "labels": {split: {k: c[k] for k in ("desirable", "undesirable")} for split, c in self.labels.items()},
            }
        return {**out, "pairs_dropped": dict(self.dropped), "pairs_written": dict(self.written)}


class Stats:
    """Accumulates the per-pair figures of the report."""

    def __init__(self, unit: str = "words", seed: int = 0, unpaired: bool = False) -> None:
        self.unit = unit
        self.unpaired = unpaired  # rows are single labelled responses: lengths by label, no margins
        self.noun = "rows" if unpaired else "pairs"
        fields = ("prompt", "desirable", "undesirable") if unpaired else ("prompt", "chosen", "rejected")
        self.lengths = {k: np.zeros(LEN_BINS, dtype=np.int64) for k in fields}
        self.turns: Counter = Counter()
        self.splits: Counter = Counter()
        self.prompts_per_split: dict[str, int] = {}
        self.longer = Counter()  # chosen vs rejected length: longer / shorter / equal
        self.margin_n, self.margin_sum = 0, 0.0
        self.margin_min, self.margin_max = float("inf"), float("-inf")
        self.margins: list[float] = []
        self._rng = random.Random(seed)
        self.clusters: list[Cluster] = []
        self.near_dup_method = "off"

    def add(self, split: str, prompt, lengths: tuple[int, int, int], score_chosen, score_rejected) -> None:
        self.splits[split] += 1
        for name, n in zip(("prompt", "chosen", "rejected"), lengths):
            self.lengths[name][min(n, LEN_BINS - 1)] += 1
        self.turns[sum(1 for m in prompt if m["role"] == "user")] += 1
        c, r = lengths[1], lengths[2]
        self.longer["longer" if c > r else "shorter" if c < r else "equal"] += 1
        if score_chosen is not None and score_rejected is not None:
            m = float(score_chosen) - float(score_rejected)
            self.margin_n += 1
            self.margin_sum += m
            self.margin_min, self.margin_max = min(self.margin_min, m), max(self.margin_max, m)
            if len(self.margins) < RESERVOIR:
                self.margins.append(m)
            else:
                j = self._rng.randrange(self.margin_n)
                if j < RESERVOIR:
                    self.margins[j] = m

    def add_response(self, split: str, prompt, lengths: tuple[int, int], label: bool) -> None:
        self.splits[split] += 1
        self.lengths["prompt"][min(lengths[0], LEN_BINS - 1)] += 1
        self.lengths["desirable" if label else "undesirable"][min(lengths[1], LEN_BINS - 1)] += 1
        self.turns[sum(1 for m in prompt if m["role"] == "user")] += 1

    @property
    def total(self) -> int:
        return sum(self.splits.values())


# --------------------------------------------------------------------------- markdown


def _pct(hist: np.ndarray, q: float) -> int:
    total = hist.sum()
    if not total:
        return 0
    return int(np.searchsorted(np.cumsum(hist), q * total, side="left"))


def _length_row(name: str, hist: np.ndarray) -> str:
    n = int(hist.sum())
    if not n:
        return f"| {name} | 0 | - | - | - | - | - |"
    nz = np.nonzero(hist)[0]
    mean = float((hist * np.arange(LEN_BINS)).sum() / n)
    cap = "+" if hist[-1] else ""
    return (f"| {name} | {n} | {int(nz[0])} | {_pct(hist, 0.5)} | {mean:.1f} | {_pct(hist, 0.95)} | "
            f"{int(nz[-1])}{cap} |")


def counts_markdown(c: Counts) -> list[str]:
    unit = "responses" if c.kind == "unpaired" else "pairs"
    lines = ["## Rows and pairs" if unit == "pairs" else "## Rows, pairs and responses", "", "| | count |",
             "| --- | ---: |", f"| input rows read | {c.rows_read} |"]
    invalid = sum(c.invalid.values())
    lines.append(f"| invalid rows skipped (--skip-invalid) | {invalid} |")
    lines.append(f"| pairs formed | {c.pairs_formed} |")
    if unit == "responses":
        lines.append(f"| responses labelled | {c.responses_formed} |")
    lines.append(f"| {unit} dropped by cleaning | {sum(c.dropped.values())} |")
    for split in sorted(c.written, key=lambda s: (s != "train", s)):
        lines.append(f"| {unit} written: {split} | {c.written[split]} |")
    lines += ["", "### Drops by reason", "", "| stage | reason | count |", "| --- | --- | ---: |"]
    for key, n in sorted(c.invalid.items()):
        lines.append(f"| invalid input | {INVALID_REASONS.get(key, key)} | {n} |")
    for key, n in sorted(c.left_out.items()):
        lines.append(f"| left out by the format | {key} | {n} |")
    for key in OUTCOMES:
        if c.pairing.get(key):
            lines.append(f"| pairing | {OUTCOMES[key]} | {c.pairing[key]} |")
    for key, label in (UNPAIRED_REASONS if unit == "responses" else REASONS).items():
        lines.append(f"| cleaning | {label} | {c.dropped.get(key, 0)} |")
    lines.append("")
    if unit == "responses":
        lines += balance_markdown(c)
    return lines


def kto_balance(c: Counts) -> dict:
    """Desirable and undesirable rows of the training split (all splits without one), and the KTO
    loss weights that correct an imbalance (align.core.data.kto_weights)."""
    split = "train" if "train" in c.labels else "all"
    counter = c.labels.get("train") or sum(c.labels.values(), Counter())
    good, bad = counter["desirable"], counter["undesirable"]
    weights = kto_weights(good, bad)
    out = {"split": split, "desirable": good, "undesirable": bad, "ratio": good / bad if bad else None,
           "target_range": list(KTO_WEIGHT_RATIO)}
    if weights:
        out.update(desirable_weight=weights[0], undesirable_weight=weights[1],
                   weighted_ratio=weights[0] * good / (weights[1] * bad))
    return out


def balance_markdown(c: Counts) -> list[str]:
    lines = ["## Label balance (KTO)", "", "| split | desirable | undesirable | desirable share |",
             "| --- | ---: | ---: | ---: |"]
    for split in sorted(c.labels, key=lambda s: (s != "train", s)):
        good, bad = c.labels[split]["desirable"], c.labels[split]["undesirable"]
        lines.append(f"| {split} | {good} | {bad} | {100 * good / max(good + bad, 1):.1f}% |")
    lines += ["", *balance_lines(kto_balance(c)), ""]
    return lines


def balance_lines(b: dict) -> list[str]:
    """What the balance means for KTO's loss weights, in words (the report and the printed summary)."""
    low, high = b["target_range"]
    where = "the training split" if b["split"] == "train" else "the rows"
    if b.get("desirable_weight") is None:
        missing = "undesirable" if b["desirable"] else "desirable"
        return [f"**{where.capitalize()} has no {missing} rows**: KTO learns from both kinds, and no loss "
                f"weights can make up for a missing one."]
    ratio = b["ratio"]
    inside = low <= ratio <= high
    lines = [f"Desirable : undesirable in {where} = {b['desirable']} : {b['undesirable']} (ratio {ratio:.3g}). "
             f"The KTO paper keeps desirable_weight x n_desirable / (undesirable_weight x n_undesirable) in "
             f"[1, 4/3]; with equal weights it is {ratio:.3g}, " + ("inside: no correction needed." if inside else "outside.")]
    lines.append(f"Suggested: `kto.desirable_weight: {float(b['desirable_weight'])}`, "
                 f"`kto.undesirable_weight: {float(b['undesirable_weight'])}` (weighted ratio {b['weighted_ratio']:.3g}).")
    return lines


def stats_markdown(s: Stats, plots: dict[str, str] | None = None) -> list[str]:
    plots = plots or {}
    noun = s.noun
    lines = [f"## {noun.capitalize()} per split", "", f"| split | {noun} | distinct prompts |", "| --- | ---: | ---: |"]
    for split in sorted(s.splits, key=lambda x: (x != "train", x)):
        prompts = s.prompts_per_split.get(split)
        lines.append(f"| {split} | {s.splits[split]} | {prompts if prompts is not None else '-'} |")
    lines += ["", f"## Lengths ({s.unit})", "", f"| field | {noun} | min | median | mean | p95 | max |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, hist in s.lengths.items():
        lines.append(_length_row(name, hist))
    if "lengths" in plots:
        lines += ["", f"![length histograms]({plots['lengths']})"]
    total = s.total
    lines += ["", "## Length bias", ""]
    if s.unpaired:
        means = {}
        for name in ("desirable", "undesirable"):
            hist = s.lengths[name]
            means[name] = float((hist * np.arange(LEN_BINS)).sum() / hist.sum()) if hist.sum() else None
        if None in means.values():
            lines.append("only one label: nothing to compare.")
        else:
            lines.append(f"desirable responses average **{means['desirable']:.1f}** {s.unit.split(' ')[0]}, "
                         f"undesirable ones {means['undesirable']:.1f}.")
    elif total:
        lines.append(
            f"chosen longer than rejected in **{100 * s.longer['longer'] / total:.1f}%** of pairs "
            f"({s.longer['longer']} of {total}); shorter in {100 * s.longer['shorter'] / total:.1f}%, "
            f"equal in {100 * s.longer['equal'] / total:.1f}%."
        )
    else:
        lines.append("no pairs.")
    if s.unpaired:
        pass  # single responses: no margins (the label balance is in the counts section)
    elif s.margin_n:
        lines += ["", "## Score margin (score_chosen - score_rejected)", ""]
        arr = np.asarray(s.margins)
        lines += [
            f"{s.margin_n} pairs with scores: min {s.margin_min:g}, median {float(np.median(arr)):g}, "
            f"mean {s.margin_sum / s.margin_n:g}, max {s.margin_max:g}"
            + (f" (median from a {len(arr)}-pair sample)" if s.margin_n > len(arr) else "") + ".",
        ]
        if "margins" in plots:
            lines += ["", f"![score margin histogram]({plots['margins']})"]
    else:
        lines += ["", "## Score margin (score_chosen - score_rejected)", "",
                  "no pair carries both scores (ranked or binary sources have none)."]
    lines += ["", "## Turns (user turns in the prompt)", "", f"| turns | {noun} |", "| ---: | ---: |"]
    lines += [f"| {t} | {n} |" for t, n in sorted(s.turns.items())]
    if "turns" in plots:
        lines += ["", f"![turns]({plots['turns']})"]
    lines += ["", f"## Top near-duplicate prompt clusters ({s.near_dup_method})", ""]
    if s.clusters:
        lines += ["| near duplicates | rows | representative prompt | one near duplicate |", "| ---: | ---: | --- | --- |"]
        for cl in s.clusters:
            lines.append(f"| {cl.members} | {cl.rows} | {_cell(cl.rep_text) or '(not in the output)'} | {_cell(cl.example)} |")
    else:
        lines.append("none found." if s.near_dup_method != "off" else "near-duplicate detection was off.")
    return lines + [""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- plots


def write_plots(s: Stats, folder: Path) -> dict[str, str]:
    """PNG histograms into `folder`; returns {name: path relative to folder's parent}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (name, hist) in zip(axes, s.lengths.items()):
        nz = np.nonzero(hist)[0]
        if len(nz):
            lo, hi = int(nz[0]), int(nz[-1])
            width = max(1, -(-(hi - lo + 1) // 40))  # at most 40 bins of equal integer width
            edges = np.arange(lo, hi + width + 1, width)
            values = [int(hist[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
            ax.bar(edges[:-1], values, width=width, align="edge")
        ax.set_title(f"{name} length")
        ax.set_xlabel(s.unit)
        ax.set_ylabel(s.noun)
    fig.tight_layout()
    fig.savefig(folder / "lengths.png", dpi=80)
    plt.close(fig)
    out["lengths"] = f"{folder.name}/lengths.png"
    if s.margins:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(s.margins, bins=40)
        ax.set_title("score margin (chosen - rejected)")
        ax.set_xlabel("margin")
        ax.set_ylabel("pairs")
        fig.tight_layout()
        fig.savefig(folder / "margins.png", dpi=80)
        plt.close(fig)
        out["margins"] = f"{folder.name}/margins.png"
    if s.turns:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        keys = sorted(s.turns)
        ax.bar([str(k) for k in keys], [s.turns[k] for k in keys])
        ax.set_title("user turns in the prompt")
        ax.set_xlabel("turns")
        ax.set_ylabel(s.noun)
        fig.tight_layout()
        fig.savefig(folder / "turns.png", dpi=80)
        plt.close(fig)
        out["turns"] = f"{folder.name}/turns.png"
    return out

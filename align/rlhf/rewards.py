"""Reward sources of the online methods: one interface for judges and reward models, weighted.

`Rewards.score(prompts, responses)` gives, for each response, every source's score and the
weighted total. A source is

- a judge (align.evaluation.judges: format, refusal, length, answer, rm:<RunDir>, or a user's
  `module:function`): scores text; None where it does not apply (or the source's `default`);
- a reward run: the reward stage's LoRA adapter and score head, loaded onto the policy's base
  model in memory (align.modeling.adapters.load_frozen_adapter) and scored through
  align.modeling.scoring.score_conversations, exactly as the reward stage and PPO score; its score
  is standardized with the run's reward_stats.json unless `normalize: false`.

The total of a response is sum_s weight_s * score_s over the sources that scored it; NaN where
none did (such a response is left out of the update and counted by the caller).
Config: align/rlhf/options.py (RewardSource).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.core.artifacts import RunDir
from align.core.errors import ConfigError, DataError
from align.rlhf.options import RewardSource, source_names

log = logging.getLogger("align")

if TYPE_CHECKING:
    import torch

    from align.modeling.models import ModelRef


def reward_runs(sources: list[RewardSource], base: "ModelRef", key: str = "rewards") -> dict[int, RunDir]:
    """The reward RunDirs the sources name, checked before anything is written.

    Each must be a finished reward run trained on this stage's base (its adapter is loaded onto it).
    """
    from align.modeling.models import content_hash

    found: dict[int, RunDir] = {}
    base_hash = None
    for i, src in enumerate(sources):
        if not src.reward_run:
            continue
        where = f"{key}[{i}].reward_run"
        run = RunDir(Path(src.reward_run))
        manifest = run.manifest()
        if manifest is None:
            raise ConfigError(f"{where}: {src.reward_run} is not a RunDir")
        if manifest.get("stage") != "reward":
            raise ConfigError(f"{where}: {src.reward_run} is a {manifest.get('stage')} run, not a reward-model run")
        if manifest.get("status") != "finished":
            raise ConfigError(f"{where}: {src.reward_run} is not finished (status: {manifest.get('status')}); run the reward stage first")
        base_hash = base_hash or content_hash(base)
        trained_on = (manifest.get("base_model") or {}).get("content_hash")
        if trained_on != base_hash:
            raise ConfigError(
                f"{where}: {src.reward_run} was trained on another base model ({(manifest.get('base_model') or {}).get('name')}); "
                f"its adapter only fits the base it was trained on (this stage's base: {base.name}). "
                f"Use judge: rm:{src.reward_run} to score with it as a separate model"
            )
        if not (run.adapter_dir / "adapter_model.safetensors").is_file():
            raise DataError(f"{where}: {run.adapter_dir} has no adapter_model.safetensors")
        found[i] = run
    return found


def answers_of(rows: list[dict]) -> dict[str, list[str]]:
    """{question: reference answers} from prompt rows with an `answer` (the answer judge's references)."""
    return {row["prompt"][-1]["content"].strip(): row["answer"] for row in rows if row.get("answer")}


@contextlib.contextmanager
def active_adapter(model, name: str):
    """Run `model` (a PEFT model) with adapter `name` only, in eval mode; everything is restored after.

    PEFT's set_adapter also marks the active adapter trainable and the others frozen, so the
    requires_grad flags are put back too.
    """
    previous = model.active_adapter
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.set_adapter(name)
    model.eval()
    try:
        yield model
    finally:
        model.set_adapter(previous)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


@dataclass
class Scores:
    """Scores of N responses: per source [N, S] (NaN where a source did not score) and the weighted total [N]."""

    names: list[str]
    per_source: "torch.Tensor"
    total: "torch.Tensor"  # NaN where no source scored the response

    def metrics(self, prefix: str) -> dict[str, float]:
        """Mean of each source over the responses it scored, the share it scored, the mean total."""
        import torch

        out: dict[str, float] = {}
        for j, name in enumerate(self.names):
            column = self.per_source[:, j]
            scored = ~torch.isnan(column)
            out[f"{prefix}/{name}"] = column[scored].mean().item() if scored.any() else math.nan
            out[f"{prefix}/{name}_scored"] = scored.float().mean().item()
        ok = ~torch.isnan(self.total)
        out[f"{prefix}/total"] = self.total[ok].mean().item() if ok.any() else math.nan
        out[f"{prefix}/unscored"] = int((~ok).sum().item())
        return out


class Rewards:
    """The configured reward sources, ready to score. `model` is the PEFT model the reward adapters join."""

    def __init__(self, sources: list[RewardSource], *, model=None, tokenizer=None, runs: dict[int, RunDir] | None = None,
                 answers: dict[str, Any] | None = None, key: str = "rewards"):
        from align.evaluation.judges import build_judge

        self.names = source_names(sources)
        self.weights = [s.weight for s in sources]
        self.model, self.tokenizer = model, tokenizer
        self._scorers: list[Any] = []
        runs = runs or {}
        for i, src in enumerate(sources):
            if src.reward_run:
                if i not in runs:
                    raise ValueError(f"{key}[{i}].reward_run: pass the checked RunDir (align.rlhf.rewards.reward_runs)")
                self._scorers.append(self._reward_adapter(i, runs[i], src.normalize, key))
            else:
                judge = build_judge(src.judge, src.args, answers, where=f"{key}[{i}].judge")
                self._scorers.append(("judge", judge, src.default, f"{key}[{i}]", src.nonfinite))

    def _reward_adapter(self, i: int, run: RunDir, normalize: bool, key: str):
        import torch

        from align.modeling.adapters import load_frozen_adapter
        from align.modeling.scoring import read_stats

        if self.model is None or not hasattr(self.model, "peft_config"):
            raise ValueError("a reward_run source needs the stage's PEFT model to load its adapter onto")
        name = f"reward{i}"
        _, head = load_frozen_adapter(self.model, run.adapter_dir, name)
        if head is None:
            raise DataError(f"{key}[{i}].reward_run: {run.adapter_dir} has no score head; is it a reward run?")
        weight = next(p for p in self.model.parameters() if p.is_floating_point())
        dtype = torch.float32 if weight.dtype == torch.uint8 else weight.dtype
        head = head.to(device=weight.device, dtype=dtype)
        stats = None
        if normalize:
            try:
                stats = read_stats(run)
            except (OSError, ValueError) as exc:
                raise DataError(f"{key}[{i}].reward_run: cannot read {run.path}/reward_stats.json ({exc}); set normalize: false") from None
        return ("adapter", name, head, stats, f"{key}[{i}]")

    @property
    def adapter_names(self) -> list[str]:
        """The reward adapters loaded onto the model (frozen)."""
        return [s[1] for s in self._scorers if s[0] == "adapter"]

    @property
    def score_heads(self) -> list["torch.nn.Module"]:
        return [s[2] for s in self._scorers if s[0] == "adapter"]

    def score(self, prompts: list[list[dict]], responses: list[str]) -> Scores:
        import torch

        from align.evaluation.judges import shown_prompt
        from align.modeling.scoring import score_conversations

        n = len(responses)
        columns = []
        for scorer in self._scorers:
            if scorer[0] == "judge":
                _, judge, default, where, nonfinite = scorer
                raw = judge.score(prompts, responses)
                if len(raw) != n:
                    raise DataError(f"judge {judge.name!r} returned {len(raw)} scores for {n} responses")
                column = judge_column(raw, default, nonfinite == "default", f"{where}: judge {judge.name!r}", prompts)
                columns.append(torch.tensor(column, dtype=torch.float32))
            else:
                _, name, head, stats, where = scorer
                conversations = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
                base = self.model.get_base_model()
                with active_adapter(self.model, name):
                    raw = score_conversations(getattr(base, base.base_model_prefix), head, self.tokenizer, conversations).cpu()
                bad = (~torch.isfinite(raw)).nonzero()
                if len(bad):
                    i = int(bad[0])
                    raise DataError(f"{where}.reward_run: the reward model scored {raw[i].item()} for the prompt "
                                    f"{shown_prompt(prompts[i])}; is its adapter (or score head) non-finite?")
                if stats is not None:
                    raw = (raw - stats["mean"]) / max(stats["std"], 1e-6)
                columns.append(raw.float())
        per_source = torch.stack(columns, dim=1) if columns else torch.zeros(n, 0)
        weights = torch.tensor(self.weights, dtype=torch.float32)
        scored = ~torch.isnan(per_source)
        total = torch.where(scored, per_source, torch.zeros_like(per_source)) @ weights
        total = torch.where(scored.any(dim=1), total, torch.full_like(total, math.nan))
        return Scores(self.names, per_source, total)


def judge_column(raw: list, default: float | None, nonfinite_to_default: bool, who: str, prompts: list[list[dict]]) -> list[float]:
    """A judge's scores as floats, NaN where it did not apply (None) and the source has no `default`.

    A NaN or inf from a judge is not "does not apply": it is an error naming the judge (`who`) and a prompt
    it gave it for, unless the source maps non-finite scores to its default (nonfinite: default)."""
    from align.evaluation.judges import check_finite_scores

    if not nonfinite_to_default:
        check_finite_scores(who, raw, prompts, " (set nonfinite: default on the source to score such responses with its default)")
    missing = math.nan if default is None else float(default)
    return [missing if score is None or not math.isfinite(float(score)) else float(score) for score in raw]


class UnscoredWatch:
    """Responses no reward source scored: a warning for a step (or round) where at least `share` of them
    were, and an error at the end of a run in which not one response was scored."""

    def __init__(self, stage: str, share: float, scored_before: bool = False):
        self.stage, self.share = stage, share
        self.responses, self.scored = 0, int(scored_before)  # a resumed run that scored earlier has scored

    def observe(self, unscored: int, n: int, when: str) -> None:
        """`unscored` of the `n` responses of one step (or round) had no score (Scores.metrics' <prefix>/unscored)."""
        unscored = int(unscored)
        self.responses += n
        self.scored += n - unscored
        if n and unscored / n >= self.share:
            log.warning("%s %s: %d of %d responses went unscored (no reward source scored them); a judge's `default` "
                        "scores the responses it does not apply to", self.stage, when, unscored, n)

    def finish(self) -> None:
        if self.responses and not self.scored:
            raise DataError(
                f"{self.stage}: no response was scored in the whole run ({self.responses} responses): every reward source "
                "returned None for every response, so nothing was learned; check the judges against the data (a judge's "
                "`default` scores responses it does not apply to)"
            )


def scored_before(metrics_path: Path, key: str, responses: int) -> bool:
    """Whether a resumed run's logged steps (metrics.jsonl) scored any response: `key` counts each step's unscored."""
    import json

    if not metrics_path.is_file():
        return False
    rows = (json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip())
    return any(key in row and row[key] < responses for row in rows)


def check_answers(sources: list[RewardSource], splits, key: str = "rewards") -> None:
    """An `answer` judge needs rows with an `answer` field; checked when the data is loaded, before anything is written."""
    from align.evaluation.judges import ANSWER

    for i, src in enumerate(sources):
        if src.judge and src.judge.strip() == ANSWER and not answers_of(splits.train + splits.eval):
            raise ConfigError(f"{key}[{i}].judge: judge 'answer' needs reference answers: no row of data.path '{splits.source}' has an 'answer' field")


def check_sources_ready(sources: list[RewardSource], runs: dict[int, RunDir], answers: dict, key: str = "rewards") -> None:
    """Before anything is written: every judge builds with its arguments, and every reward run has its score
    head and (normalize: true) readable stats. Reward-model judges (rm:) load a model and are built later."""
    from align.evaluation.judges import build_judge
    from align.modeling.scoring import check_reward_files

    for i, src in enumerate(sources):
        if src.judge and not src.judge.strip().startswith("rm:"):
            build_judge(src.judge, src.args, answers, where=f"{key}[{i}].judge")
        elif i in runs:
            check_reward_files(runs[i], f"{key}[{i}].reward_run", src.normalize, f"or set {key}[{i}].normalize: false")


def run_inputs(runs: dict[int, RunDir]) -> dict | None:
    """The identities of the reward runs a stage reads (part of its run key: a retrained reward model reruns it)."""
    if not runs:
        return None
    return {"reward_runs": {str(i): (run.manifest() or {}).get("run_id") for i, run in runs.items()}}


def held_out_metrics(model, tokenizer, rewards: Rewards, prompts: list[list[dict]], sampling, seed: int) -> dict:
    """One sample per held-out prompt from `model` as it is: each source's reward, the total, the KL to
    the reference (adapters disabled; k1 summed per response) and the response length.

    Prompt i's sample is drawn with the seed (seed, "held-out", i); with several processes each samples
    and scores its share of the prompts and the means are over all of them, so the figures do not
    depend on the number of processes. The global RNG is left as it was (training's draws stay put)."""
    import torch

    from align.modeling.generation import Sampling, response_logprobs, sample_tokens
    from align.rlhf.distributed import row_seed, world
    from align.rlhf.losses import kl_per_token

    ranks = world()
    mine = ranks.share(len(prompts))
    one = Sampling(**{**sampling.__dict__, "num_return_sequences": 1, "seed": None})
    state = torch.get_rng_state()
    was_training = model.training
    model.eval()
    rows: dict = {}
    try:
        if len(mine):
            with torch.no_grad():
                roll = sample_tokens(model, tokenizer, [prompts[i] for i in mine], one, row_seeds=[row_seed(seed, "held-out", i) for i in mine])
                logp = response_logprobs(model, roll.seq, roll.attn, roll.n_resp)
                with model.disable_adapter():
                    ref = response_logprobs(model, roll.seq, roll.attn, roll.n_resp)
            scores = rewards.score(roll.prompts, roll.responses)
            rows = {"per_source": scores.per_source, "total": scores.total,
                    "kl": (kl_per_token(logp, ref, "k1") * roll.mask).sum(1).cpu(), "length": roll.mask.sum(1).cpu()}
    finally:
        torch.set_rng_state(state)
        model.train(was_training)
    parts = [p for p in ranks.gather(rows) if p]
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out = Scores(rewards.names, joined["per_source"], joined["total"]).metrics("eval/reward")
    out.update({"eval/kl": joined["kl"].mean().item(), "eval/response_length": joined["length"].mean().item()})
    return out

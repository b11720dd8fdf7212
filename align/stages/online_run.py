"""What the online stages share around their loops (align/rlhf/): opening the run (prompts, reward sources,
the processes' agreement, prompts that fit), and the run of the group-RL methods (GRPO, RLOO)."""

from __future__ import annotations

import dataclasses

from align.core.artifacts import ADAPTER, RunDir
from align.core.errors import DataError
from align.stages.samples import finish_with_samples
from align.stages.stage_run import StageRun, resolve_base


def open_online_stage(cfg, force: bool, check_processes=None) -> tuple["StageRun", list]:
    """An online stage's prompts, reward runs (adapters on this base) and StageRun: the launch
    (`check_processes(n)` refuses a split over n processes that cannot work), data and reward sources
    checked before anything is written. Returns (stage, reward runs)."""
    from align.core.data import load_splits
    from align.rlhf.distributed import launched_size
    from align.rlhf.rewards import answers_of, check_answers, check_sources_ready, reward_runs, run_inputs

    if check_processes is not None:
        check_processes(launched_size())
    splits = load_splits(cfg.data, "prompt", cfg.train.seed)
    check_answers(cfg.rewards, splits)
    base, parent = resolve_base(cfg)
    runs = reward_runs(cfg.rewards, base)
    check_sources_ready(cfg.rewards, runs, answers_of(splits.train + splits.eval))
    stage = StageRun(cfg, base=base, splits=splits, parent=parent, force=force, inputs=run_inputs(runs))
    join_processes(stage)
    if not stage.skipped:
        check_prompts_fit(stage)
    return stage, runs


def check_prompts_fit(stage: "StageRun") -> None:
    """An online stage samples responses of up to <section>.max_new_tokens after each prompt: a prompt whose
    responses cannot fit train.max_length is refused before the run starts, naming its file and line (it
    would otherwise be a memory error, or a cut prompt, mid-run)."""
    from align.modeling import models
    from align.modeling.templates import chat_ids

    cfg = stage.cfg
    # The method's sampling section (online:, ppo:, a group section); samples: is the end-of-stage table's.
    section = next(f.name for f in dataclasses.fields(cfg) if f.name != "samples" and hasattr(getattr(cfg, f.name), "max_new_tokens"))
    new_tokens, limit = getattr(cfg, section).max_new_tokens, cfg.train.max_length
    tokenizer = models.load_tokenizer(stage.base, cfg.model)
    for split, rows in (("train", stage.splits.train), ("eval", stage.splits.eval)):
        for i, row in enumerate(rows):
            n = len(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True))
            if n + new_tokens > limit:
                raise DataError(
                    f"{stage.splits.where(split, i)}: the prompt is {n} tokens; with {section}.max_new_tokens={new_tokens} its "
                    f"responses need {n + new_tokens} > train.max_length={limit}: shorten or leave out this prompt, or raise "
                    "train.max_length"
                )


def join_processes(stage: "StageRun") -> None:
    """Several processes: they join the launcher's process group and agree on rank 0's decisions (skip,
    the checkpoint to resume from), so every rank restarts from the same checkpoint."""
    from align.rlhf.distributed import start

    ranks = start(stage.stage)
    stage.skipped, stage.resume_from = ranks.broadcast((stage.skipped, stage.resume_from))


def run_group_stage(cfg, *, force: bool, callbacks=()) -> RunDir:
    """The run of a group-RL method (GRPO, RLOO: one loop, align/rlhf/group.py, with its record's advantage estimator):
    prompts, reward sources, train, samples."""
    from align.rlhf import group as G
    from align.stages.registry import get_stage

    stage, runs = open_online_stage(cfg, force, lambda n: G.check_processes(cfg, n))
    if stage.skipped:
        return stage.run_dir
    with stage:
        gp, summary = G.train(stage, cfg, get_stage(cfg.stage).estimator, runs, callbacks)
        finish_with_samples(stage, gp.model, gp.tokenizer, summary, {"adapter": ADAPTER}, step=cfg.train.max_steps)
    return stage.run_dir

"""Online (iterative) DPO: the loop of rounds, sample -> score -> pair -> DPO, with a LoRA policy on one base.

Round n samples `online.num_samples` responses per prompt from the policy as round n-1 left it
(round 1: the fresh adapter, which is the SFT model), scores them with the reward sources
(judges and reward-model adapters on the same base, align/rlhf/rewards.py), pairs them per prompt
with the pairing and cleaning `align-data generate` uses (align/core/pairing.py; the round's files:
align/rlhf/rounds.py), and trains the same adapter on those pairs with the DPO stage's trainer
(align/preference/dpo_setup.py: TRL's DPOTrainer with the fast path). The reference stays the SFT
model (the base with adapters disabled) in every round. A checkpoint after a round holds the adapter,
and --resume continues with the next round. `cfg` below is the online DPO stage's config.
"""

from __future__ import annotations

import logging

from align.core.callbacks import StepTimer
from align.core.safeguards import InterruptCallback, Interrupted
from align.rlhf import loop
from align.rlhf.policy import OnlinePolicy

log = logging.getLogger("align")

POLICY = loop.DEFAULT_ADAPTER  # PEFT's "default" adapter: TRL's DPOTrainer trains that one


def train(stage, cfg, reward_runs, callbacks=()) -> tuple[OnlinePolicy, dict]:
    """Rounds 1..online.rounds (resuming after the checkpoint's round), then the kept or last adapter saved as
    adapter/; returns the policy and the summary. `callbacks` go to each round's trainer. Every rank runs this."""
    import torch
    from transformers import set_seed

    from align.core.errors import AlignError
    from align.core.safeguards import oom_advice
    from align.modeling import models
    from align.rlhf.rewards import answers_of

    set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(stage.base, cfg.model)
    policy = OnlinePolicy(cfg, stage.base, tokenizer, POLICY, reward_runs, answers_of(stage.splits.train + stage.splits.eval))
    rounds = _Rounds(stage, cfg, policy, callbacks)
    rounds.interrupt.install()
    try:
        final = rounds.run()
    except torch.cuda.OutOfMemoryError as exc:
        raise AlignError(oom_advice(cfg, rounds.step + 1)) from exc
    finally:
        rounds.interrupt.uninstall()
    return policy, rounds.finish(final)


class _Rounds:
    """The rounds' state (done rounds, DPO steps, pairs so far) and what each round does."""

    def __init__(self, stage, cfg, policy: OnlinePolicy, callbacks):
        from align.core.data import distinct_prompts
        from align.modeling import models
        from align.rlhf.distributed import world
        from align.rlhf.keep_best import KeepBest
        from align.rlhf.rewards import UnscoredWatch

        self.stage, self.cfg, self.policy, self.callbacks = stage, cfg, policy, callbacks
        self.model, o = policy.model, cfg.online
        self.ranks = world()
        self.counts = models.count_parameters(self.model)
        self.keep = KeepBest(o.keep_best_within_kl, "eval/reward/total", unit="round")
        self.done_rounds, self.step, self.pairs = 0, 0, 0
        if stage.resume_from is not None:
            state = loop.load_checkpoint(stage.resume_from, self.model, [POLICY])
            self.done_rounds, self.step, self.pairs = state["round"], state["step"], state["pairs"]
            self.keep.load(stage.resume_from)
        self.prompts = [r["prompt"] for r in stage.splits.train]
        self.eval_prompts = distinct_prompts(stage.splits.eval, o.eval_prompts) if o.eval_prompts else []
        self.interrupt, self.timer = InterruptCallback(), StepTimer()
        self.watch = UnscoredWatch("online_dpo", cfg.unscored_warning, scored_before=self.pairs > 0)
        self.fast_path = None

    def evaluate(self, round_no: int) -> dict:
        from align.rlhf.keep_best import adapter_weights
        from align.rlhf.rewards import held_out_metrics
        from align.rlhf.rounds import sampling_for

        if not self.eval_prompts:
            return {}
        t = self.cfg.train
        metrics = held_out_metrics(self.model, self.policy.tokenizer, self.policy.rewards, self.eval_prompts,
                                   sampling_for(self.cfg.online, t.seed), t.seed)
        self.keep.offer(round_no, metrics, lambda: adapter_weights(self.model, POLICY))
        return metrics

    def finite(self, round_no: int) -> None:
        from align.core.checkpoints import latest_complete
        from align.core.safeguards import check_finite

        self.model.set_adapter(POLICY)
        check_finite(self.model, f"after round {round_no} (step {self.step})", lambda: latest_complete(self.stage.run_dir.path))

    def save(self, round_no: int):
        self.finite(round_no)
        state = {"round": round_no, "pairs": self.pairs}
        return loop.save_checkpoint(self.stage.run_dir.path, self.step, self.model, [POLICY], None, None, state,
                                    self.cfg.train.save_total_limit, extra=self.keep.save)

    def run(self) -> dict:
        """Every round still to do; returns the final held-out evaluation (the last round's metrics when it was one)."""
        o, t = self.cfg.online, self.cfg.train
        if self.done_rounds == 0:
            self.stage.tracker.log(self.evaluate(0), step=0)
        metrics = {}
        for r in range(self.done_rounds + 1, o.rounds + 1):
            metrics = self.round(r)
            if (t.eval_steps and r % t.eval_steps == 0) or r == o.rounds:
                metrics.update(self.evaluate(r))
            if self.ranks.main:
                log.info("online_dpo round %d: %d pairs from %d prompts, sampled reward %.3f, %d DPO steps", r, metrics["online/pairs"],
                         metrics["online/prompts"], metrics["online/reward/total"], metrics.get("online/dpo_steps", 0))
            self.stage.tracker.log(metrics, step=self.step)
            if t.save_steps and r % t.save_steps == 0:
                self.save(r)
        return metrics if self.done_rounds < o.rounds else self.evaluate(o.rounds)

    def round(self, r: int) -> dict:
        """Round r: sample, score and pair (rank 0 writes rounds/round-<r>/), then DPO on the pairs; its metrics."""
        from align.rlhf.rounds import pairs_of, sample_round, write_round

        o, t = self.cfg.online, self.cfg.train
        per_round = o.prompts_per_round or len(self.prompts)
        round_prompts = loop.batch_prompts(self.prompts, r - 1, per_round, t.seed) if o.prompts_per_round else self.prompts
        samples = sample_round(self.policy.engine, self.policy.rewards, round_prompts, o, seed=t.seed, round_no=r)  # every rank: all
        pairs, outcome = pairs_of(samples, o.pairing, o.min_margin, r)
        if self.ranks.main:
            write_round(self.stage.run_dir.path, r, samples, pairs)
        metrics = {"online/round": r, "online/prompts": len(round_prompts), "online/pairs": len(pairs),
                   **{f"online/unpaired/{k}": v for k, v in outcome.items()}, **samples.scores.metrics("online/reward")}
        self.watch.observe(metrics["online/reward/unscored"], len(samples.scores.total), f"round {r}")
        if not pairs:
            log.warning("online_dpo round %d: no pairs (every prompt's samples tied or were unscored); the adapter is unchanged", r)
        if self.ranks.any(bool(self.interrupt.signal_name)):  # caught while sampling: the policy is still round r-1's
            self.interrupt.signal_name = self.interrupt.signal_name or "SIGTERM"
            raise Interrupted(f"{self.interrupt.signal_name} before round {r} trained; checkpoint saved in {self.save(r - 1)}; "
                              "continue with --resume (resume=true)", exit_code=self.interrupt.exit_code)
        figures = train_round(self.stage, self.cfg, self.model, self.policy.tokenizer, pairs, self.step, self.interrupt,
                              self.timer, self.callbacks) if pairs else {}
        self.fast_path = figures.pop("fast_path", self.fast_path)
        self._stop_if_interrupted(r)
        self.step += figures.get("online/dpo_steps", 0)
        self.pairs += len(pairs)
        return {**metrics, **figures}

    def _stop_if_interrupted(self, r: int) -> None:
        from align.core.checkpoints import latest_complete

        if self.ranks.any(bool(self.interrupt.signal_name)):
            self.interrupt.signal_name = self.interrupt.signal_name or "SIGTERM"
            checkpoint = latest_complete(self.stage.run_dir.path)
            where = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved (train.save_steps)"
            raise Interrupted(f"{self.interrupt.signal_name} during round {r}; its training is lost; {where}; "
                              "continue with --resume (resume=true), which repeats that round", exit_code=self.interrupt.exit_code)

    def finish(self, final: dict) -> dict:
        """The kept adapter (keep_best_within_kl) or the last one as adapter/; the summary of the rounds."""
        from align.core.checkpoints import CHECKPOINTS
        from align.rlhf.keep_best import keep_last_then_restore

        o = self.cfg.online
        self.watch.finish()
        self.finite(o.rounds)
        last = self.stage.run_dir.path / CHECKPOINTS / f"checkpoint-{self.step}"
        keep_last_then_restore(self.keep, last, lambda: self.save(o.rounds), self.model, POLICY)
        self.counts.update(loop.save_policy_adapter(self.stage, self.model, POLICY))
        before = loop.logged_at_step(self.stage.run_dir, 0)
        self.model.set_adapter(POLICY)
        return {
            "rounds": o.rounds,
            "pairs": self.pairs,
            "steps": self.step,
            "seconds_per_step": self.timer.seconds_per_step(),
            "eval_reward_before": before.get("eval/reward/total"),
            "eval_reward_after": final.get("eval/reward/total"),
            "eval_kl_after": final.get("eval/kl"),
            "parameters": self.counts,
            **self.keep.summary(),
            **({"dpo_fast_path": self.fast_path} if self.fast_path else {}),
        }


def train_round(stage, cfg, model, tokenizer, pairs: list[dict], step_offset: int, interrupt, timer, callbacks) -> dict:
    """DPO on one round's pairs, continuing the adapter; returns the round's training figures."""
    import shutil

    from datasets import Dataset

    from align.core.callbacks import TrackerCallback
    from align.core.checkpoints import latest_complete
    from align.core.examples import convert_rows
    from align.core.safeguards import NonFiniteGuard, NonFiniteWeightsGuard
    from align.modeling.lora_plus import use_param_groups
    from align.modeling.train_setup import trainer_kwargs
    from align.preference.dpo_setup import dpo_trainer, fast_path_summary, pair_converter
    from align.rlhf.rounds import restored_forward, stop_on_signal

    kept, truncated, dropped = convert_rows(pairs, pair_converter(tokenizer, cfg.train.max_length))
    figures = {"online/pairs_truncated": truncated, "online/pairs_dropped_max_length": dropped, "online/dpo_steps": 0}
    if not kept:
        return figures
    device = str(next(model.parameters()).device)
    scratch = stage.run_dir.path / ".round-trainer"  # the HF trainer's own folder; rounds are checkpointed whole instead
    base_args = trainer_kwargs(cfg, stage.run_dir, device, has_eval=False, model=model.get_base_model(), rows_per_example=2)
    base_args.update(output_dir=str(scratch), save_strategy="no")
    last_checkpoint = lambda: latest_complete(stage.run_dir.path)  # noqa: E731
    guards = [TrackerCallback(stage.tracker, stage, step_offset), NonFiniteGuard(last_checkpoint),
              NonFiniteWeightsGuard(last_checkpoint, step_offset), stop_on_signal(interrupt), timer]
    try:
        with restored_forward(model.get_base_model()):
            trainer = dpo_trainer(cfg, model, tokenizer, Dataset.from_list(kept), None, base_args, [*guards, *callbacks])
            use_param_groups(trainer, cfg)  # LoRA+
            result = trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures.update({"online/dpo_steps": trainer.state.global_step, "online/dpo_loss": result.training_loss})
    figures["fast_path"] = fast_path_summary(trainer)
    return figures

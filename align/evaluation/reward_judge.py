"""A trained reward model as a judge: `load_judge("rm:<reward RunDir>")`.

Loads the reward run's base (the merged SFT model) as a sequence classifier with the
reward adapter and its score head, and scores prompt + response conversations the way
the reward stage trained on them (align.modeling.scoring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from align.core.artifacts import RunDir
from align.evaluation.judges import JudgeSpecError


def finished_reward_run(path: str) -> RunDir:
    """The reward RunDir a spec names; a JudgeSpecError unless it is a finished reward run."""
    run = RunDir(Path(path))
    manifest = run.manifest()
    if not manifest or manifest.get("stage") != "reward" or manifest.get("status") != "finished":
        raise JudgeSpecError(f"judge 'rm:{path}': not a finished reward-model RunDir")
    return run


def check_spec(path: str) -> None:
    """The cheap check of an "rm:" spec (loads no model): it names a RunDir.

    Whether that run is a finished reward run is checked when the judge loads: in a pipeline
    the reward stage may not have run yet when the specs are checked.
    """
    if RunDir(Path(path)).manifest() is None:
        raise JudgeSpecError(f"judge 'rm:{path}': {path or '(empty)'} is not a RunDir")


class RewardModelJudge:
    """Scores every response (never None) with the reward model of a reward RunDir."""

    def __init__(self, run_dir: str, batch_size: int = 16):
        run = finished_reward_run(run_dir)
        self.name = "rm"
        self.run_dir = run.path
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None
        self._base = Path(run.manifest()["base_model"]["location"])

    def _load(self):
        from peft import PeftModel

        from align.core.config import ModelConfig
        from align.modeling import models

        ref = models.ModelRef(str(self._base), str(self._base), True)
        self._tokenizer = models.load_tokenizer(ref, ModelConfig())
        model = models.load_model(ref, ModelConfig(), head="score")
        model.config.pad_token_id = self._tokenizer.pad_token_id
        self._model = PeftModel.from_pretrained(model, str(self.run_dir / "adapter")).eval()

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float | None]:
        from align.modeling.scoring import score_with_model

        if self._model is None:
            self._load()
        conversations = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return score_with_model(self._model, self._tokenizer, conversations, self.batch_size)

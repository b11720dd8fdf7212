"""A trained reward model as a judge: `load_judge("rm:<reward RunDir>")`.

Loads the reward run's base (the merged SFT model) as a sequence classifier with the
reward adapter and its score head, and scores prompt + response conversations the way
the reward stage trained on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from align.judges import JudgeSpecError


class RewardModelJudge:
    """Scores every response (never None) with the reward model of a reward RunDir."""

    def __init__(self, run_dir: str, batch_size: int = 16):
        from align.artifacts import RunDir

        run = RunDir(Path(run_dir))
        manifest = run.manifest()
        if not manifest or manifest.get("stage") != "reward" or manifest.get("status") != "finished":
            raise JudgeSpecError(f"judge 'rm:{run_dir}': not a finished reward-model RunDir")
        self.name = "rm"
        self.run_dir = run.path
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None
        self._base = Path(manifest["base_model"]["location"])

    def _load(self):
        from peft import PeftModel

        from align import models
        from align.config import ModelConfig

        ref = models.ModelRef(str(self._base), str(self._base), True)
        self._tokenizer = models.load_tokenizer(ref, ModelConfig())
        model = models.load_model(ref, ModelConfig(), head="score")
        model.config.pad_token_id = self._tokenizer.pad_token_id
        self._model = PeftModel.from_pretrained(model, str(self.run_dir / "adapter")).eval()

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float | None]:
        from align.stages.reward import score_conversations

        if self._model is None:
            self._load()
        conversations = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return score_conversations(self._model, self._tokenizer, conversations, self.batch_size)

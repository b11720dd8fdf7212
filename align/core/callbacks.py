"""The HF Trainer callbacks every Trainer-driven stage attaches besides the safeguards: the tracker
bridge (logs to W&B and metrics.jsonl, the step in progress for error messages) and the step timer."""

from __future__ import annotations

import time
from transformers import TrainerCallback

from align.core.tracking import Tracker, trainer_metric_name

class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, update); evaluations fall outside it."""

    def __init__(self):
        self.durations: list[float] = []
        self._started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.durations.append(time.perf_counter() - self._started)
            self._started = None

    def seconds_per_step(self) -> float | None:
        return round(sum(self.durations) / len(self.durations), 3) if self.durations else None


class TrackerCallback(TrainerCallback):
    """Forwards HF Trainer logs to the stage's tracker under train/... and eval/... names; keeps the
    stage's step current for error messages.

    `stage`: the StageRun, whose `step` and `phase` this keeps current; `step_offset`: steps taken before
    this trainer started (online DPO trains one trainer per round).
    """

    def __init__(self, tracker: Tracker, stage=None, step_offset: int = 0):
        self.tracker = tracker
        self.stage = stage
        self.step_offset = step_offset

    def on_step_begin(self, args, state, control, **kwargs):
        if self.stage is not None:
            self.stage.step = self.step_offset + state.global_step + 1

    def on_train_end(self, args, state, control, **kwargs):
        if self.stage is not None:
            self.stage.phase = "finishing (evaluation, saving, samples)"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.tracker.log({trainer_metric_name(k): v for k, v in logs.items()}, step=self.step_offset + state.global_step)

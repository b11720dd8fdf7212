"""Guards that turn faults into clear outcomes instead of silent damage.

- Ctrl-C / SIGTERM: finish the current step, save a checkpoint, stop with a message.
- A non-finite gradient: stop before the optimizer applies it, naming the step; the
  checkpoints on disk are the last good state.
- Not enough disk for a stage's outputs: refuse to start.
- CUDA out of memory: say which settings reduce memory.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from align.core.errors import AlignError


class NonFiniteError(AlignError):
    """Training produced a NaN or inf gradient (or loss): lower the learning rate, check the data."""


class Interrupted(AlignError):
    """The user stopped a stage (SIGINT/SIGTERM) after it saved a checkpoint."""

    label = "interrupted"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class InterruptCallback(TrainerCallback):
    """On SIGINT/SIGTERM: checkpoint after the current step and stop training.

    A second signal restores the default behaviour (a second Ctrl-C aborts at once).
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name or "SIGINT"))

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.signal_name is not None):  # all ranks must stop at the same step
            self.signal_name = self.signal_name or "SIGTERM"
            control.should_save = True
            control.should_training_stop = True
        return control


def _any_rank(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class NonFiniteGuard(TrainerCallback):
    """Raises before the optimizer step if any trainable gradient is NaN or inf."""

    def __init__(self, last_checkpoint):
        self.last_checkpoint = last_checkpoint  # () -> Path | None, read when it fires

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        for name, param in model.named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                checkpoint = self.last_checkpoint()
                kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
                raise NonFiniteError(
                    f"non-finite gradient at step {state.global_step + 1} (first in {name}); "
                    f"training stopped before applying it; {kept}"
                )
        return control


def check_disk_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start a stage whose outputs will not fit (with 10% headroom)."""
    probe = Path(folder).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.1:
        raise AlignError(
            f"output_dir: {folder} has {free / 2**30:.2f} GiB free; this stage needs about "
            f"{needed_bytes / 2**30:.2f} GiB (adapter, checkpoints, merged model); free space or choose another output_dir"
        )


def oom_advice(cfg, step: int) -> str:
    """What to change after a CUDA out-of-memory error, from the settings that caused it."""
    t = cfg.train
    tips = []
    if t.batch_size > 1:
        tips.append(
            f"train.batch_size={max(1, t.batch_size // 2)} with train.gradient_accumulation_steps="
            f"{t.gradient_accumulation_steps * 2} (same effective batch)"
        )
    if t.gradient_checkpointing is not True:  # off, or auto (which may have chosen off)
        tips.append("train.gradient_checkpointing=true")
    tips.append(f"train.max_length={max(64, t.max_length // 2)}")
    if cfg.model.quantization == "none":
        tips.append("model.quantization=4bit (QLoRA)")
    return (
        f"CUDA out of memory at step {step} (batch_size={t.batch_size}, max_length={t.max_length}, "
        f"gradient_checkpointing={str(t.gradient_checkpointing).lower()}, quantization={cfg.model.quantization}); "
        "to use less memory try: " + "; ".join(tips)
    )

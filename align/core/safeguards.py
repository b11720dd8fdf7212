"""Guards that turn faults into clear outcomes instead of silent damage.

- Ctrl-C / SIGTERM: finish the current step, save a checkpoint, stop with a message.
- A non-finite gradient: stop before the optimizer applies it, naming the step; the
  checkpoints on disk are the last good state.
- Non-finite weights (or finite weights whose outputs overflow) and a non-finite held-out loss:
  checked before each checkpoint, at each evaluation and at the end; the run fails naming the
  step, and no non-finite state is ever checkpointed or saved as the run's adapter.
- Not enough disk for a stage's outputs: refuse to start.
- CUDA out of memory: say which settings reduce memory.
"""

from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from align.core.errors import AlignError


class NonFiniteError(AlignError):
    """Training produced a NaN or inf gradient (or loss): lower the learning rate, check the data."""


class NonFiniteWeightsError(AlignError):
    """Training left NaN or inf in the weights (or in what they compute): the run fails, nothing non-finite is saved."""


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


def non_finite_part(model, probe: bool = True) -> str | None:
    """The first trainable parameter holding NaN or inf; else, with `probe`, "its outputs" when a forward pass
    of a few tokens is not finite (finite weights whose products overflow, e.g. a LoRA B of 1e308); else None."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            return name
    if not probe:
        return None
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.arange(1, 1 + min(8, model.get_input_embeddings().num_embeddings - 1), device=device)[None]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = out.logits if hasattr(out, "logits") else out[0]
    finally:
        model.train(was_training)
    return None if torch.isfinite(logits.float()).all() else "its outputs (the weights are finite, what they compute is not)"


def check_finite(model, when: str, last_checkpoint, probe: bool = True) -> None:
    """Raise NonFiniteWeightsError naming `when` ("after step 3") and the last finite checkpoint."""
    bad = non_finite_part(model, probe)
    if bad is not None:
        raise NonFiniteWeightsError(
            f"non-finite weights {when} (first in {bad}); {_kept(last_checkpoint())}; lower train.learning_rate "
            "or check the data"
        )


def _kept(checkpoint) -> str:
    return f"the last finite checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before"


class NonFiniteWeightsGuard(TrainerCallback):
    """Checks the trainable weights and a forward pass before every checkpoint and at the end of training, and
    the weights and held-out loss of every evaluation (whose loss already is a forward pass): a non-finite state
    fails the run before it is checkpointed or saved, so the checkpoints on disk stay finite.

    `step_offset`: steps taken before this trainer started (online DPO trains one trainer per round)."""

    def __init__(self, last_checkpoint, step_offset: int = 0):
        self.last_checkpoint = last_checkpoint  # () -> Path | None, read when it fires
        self.step_offset = step_offset

    def _check(self, args, state, model, probe: bool = True) -> None:
        sharded = bool(getattr(args, "fsdp", None) or getattr(args, "deepspeed", None))  # no single-rank forward there
        check_finite(model, f"after step {self.step_offset + state.global_step}", self.last_checkpoint, probe=probe and not sharded)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:  # the checkpoint about to be written must hold finite weights
            self._check(args, state, model)
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteWeightsError(
                f"non-finite held-out loss ({loss}) after step {self.step_offset + state.global_step}; "
                f"{_kept(self.last_checkpoint())}; lower train.learning_rate or check the data"
            )
        self._check(args, state, model, probe=False)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._check(args, state, model)
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

"""The step loop and checkpoints of the RL stages (PPO, GRPO, RLOO; online DPO checkpoints per round).

`run_steps` runs steps start..total: a held-out evaluation before the first step (step 0) and
every `eval_every` steps, metrics to the stage's tracker, checkpoints every `save_every` steps,
Ctrl-C / SIGTERM (the current step finishes, a checkpoint is saved, the stage stops with the
resume hint), a non-finite gradient (stops naming the step and the last good checkpoint), CUDA
out of memory (the settings that reduce memory).

A checkpoint holds named adapters of one PEFT model, optional extra modules (a value head),
the optimizer and scheduler, the RNG states and a small state dict; it counts once COMPLETE is
written (align.core.checkpoints), and only the newest `keep` are kept. Nothing in it is code:
safetensors, JSON, and tensors loaded with weights_only.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Callable

import torch

from align.core.files import atomic_dir, atomic_write_json, atomic_write_text
from align.core.checkpoints import CHECKPOINTS, COMPLETE, checkpoint_dirs, load_plain
from align.core.errors import DataError
from align.modeling.lora_init import finish_saved_adapter

log = logging.getLogger("align")

DEFAULT_ADAPTER = "default"  # PEFT saves this adapter at the top of a folder, others in a subfolder named after them


def save_checkpoint(
    run_path: Path, step: int, model, adapters: list[str], optimizer, scheduler, state: dict, keep: int,
    modules: dict[str, torch.nn.Module] | None = None, extra: Callable[[Path], None] | None = None,
) -> Path:
    """checkpoints/checkpoint-<step>/: adapters/, <module>.safetensors, optimizer.pt, rng_state.pt, state.json, COMPLETE;
    `extra(folder)` writes more into it (the best adapter so far, align/rlhf/keep_best.py).

    Every rank calls it (each hands in its RNG state); rank 0 writes: the ranks hold the same adapters
    and optimizer state, since their gradients are summed before every update (align/rlhf/distributed.py).
    """
    from safetensors.torch import save_file

    from align.rlhf.distributed import world

    folder = Path(run_path) / CHECKPOINTS / f"checkpoint-{step}"
    rng = world().gather(_rng_state())  # one entry per rank: dropout draws differ between ranks
    if not world().main:
        return folder
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp / "adapters"), selected_adapters=adapters)
        for name, module in (modules or {}).items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None}, tmp / "optimizer.pt")
        torch.save({**rng[0], "ranks": rng}, tmp / "rng_state.pt")
        atomic_write_json(tmp / "state.json", {"step": step, **state})
        if extra is not None:
            extra(tmp)
        atomic_write_text(tmp / COMPLETE, f"step {step}\n")
    for _, old in checkpoint_dirs(run_path)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # a GPU resume samples the same rollouts only with the CUDA generators restored
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def adapter_file(folder: Path, name: str) -> Path:
    sub = folder / "adapters"
    return (sub if name == DEFAULT_ADAPTER else sub / name) / "adapter_model.safetensors"


def load_checkpoint(folder: Path, model, adapters: list[str], optimizer=None, scheduler=None,
                    modules: dict[str, torch.nn.Module] | None = None, state_types: dict[str, type] | None = None) -> dict:
    """Restore what `save_checkpoint` wrote (adapters, modules, optimizer, scheduler, RNG); returns state.json,
    its `state_types` keys converted (e.g. {"step": int}).

    A checkpoint is data: safetensors, JSON, and torch.save files of tensors and plain containers
    (load_plain), never pickled code. Anything malformed is one line naming the folder.
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "state.json").read_text())
        for key, kind in {"step": int, **(state_types or {})}.items():
            meta[key] = kind(meta[key])
        state = load_plain(folder / "optimizer.pt") if optimizer is not None else None
        rng = _rank_rng(load_plain(folder / "rng_state.pt"))
        for name in adapters:
            set_peft_model_state_dict(model, load_file(str(adapter_file(folder, name))), adapter_name=name)
        for name, module in (modules or {}).items():
            module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuples(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign checkpoint, whatever broke
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{folder}: cannot resume from this checkpoint: {type(exc).__name__}: {first[:200]}") from None
    return meta


def _rank_rng(saved: dict) -> dict:
    """This rank's RNG state from a checkpoint; a checkpoint of another number of processes gives rank 0's."""
    from align.rlhf.distributed import world

    ranks = saved.get("ranks") or [saved]
    here = world()
    if len(ranks) != here.size:
        log.warning("resume: the checkpoint was written by %d processes, this run has %d; every rank restores rank 0's "
                    "random state (only dropout draws use it)", len(ranks), here.size)
        return ranks[0]
    return ranks[here.rank]


def _as_tuples(state):
    """random.setstate wants the nested tuples getstate gave (a weights-only load may return lists)."""
    return tuple(_as_tuples(x) for x in state) if isinstance(state, (list, tuple)) else state


def save_standard_adapter(model, name: str, target: Path, modules: dict[str, torch.nn.Module] | None = None) -> Path:
    """Adapter `name` of a multi-adapter PEFT model as a standard adapter folder (top level), with
    `modules` beside it as <name>.safetensors, written atomically."""
    from safetensors.torch import save_file

    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=[name])
        if name != DEFAULT_ADAPTER:  # PEFT puts a non-default adapter in a subfolder named after it
            for item in (tmp / name).iterdir():
                item.rename(tmp / item.name)
            (tmp / name).rmdir()
        finish_saved_adapter(model, tmp, name)  # PiSSA/OLoRA: converted to a LoRA of the unchanged base
        for module_name, module in (modules or {}).items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{module_name}.safetensors"))
    return target


def save_policy_adapter(stage, model, name: str) -> dict:
    """The trained adapter `name` as the run's adapter/ (standard PEFT format), logged as an artifact; rank 0 writes.
    Returns {"adapter_bytes": its size on disk} (empty on other ranks)."""
    from align.core.artifacts import ADAPTER
    from align.modeling.adapters import adapter_bytes
    from align.rlhf.distributed import world

    if not world().main:
        return {}
    target = stage.run_dir.path / ADAPTER
    save_standard_adapter(model, name, target)
    stage.tracker.log_artifact(target, name=f"{stage.stage}-adapter", type="model",
                               metadata={"stage": stage.stage, "base_model": stage.base.name})
    return {"adapter_bytes": adapter_bytes(target)}


def run_steps(
    stage,
    cfg,
    *,
    start: int,
    total: int,
    step_fn: Callable[[int], dict],
    save_fn: Callable[[int], Path],
    eval_fn: Callable[[], dict] | None,
    describe: Callable[[int, dict], str],
    desc: str,
    on_eval: Callable[[int, dict], None] | None = None,
) -> dict:
    """Steps start..total (step_fn(i) runs step i + 1 and returns its metrics); returns the final evaluation.

    `stage` is the StageRun (its tracker and run_dir); `cfg.train` gives eval_steps, save_steps
    and logging_steps (each counting steps), and `cfg` the settings OOM advice names.
    `on_eval(step, metrics)` sees every held-out evaluation (keep_best.KeepBest.offer), before the
    step's checkpoint is written.
    """
    from tqdm.auto import tqdm

    from align.core.checkpoints import latest_complete
    from align.core.errors import AlignError
    from align.core.safeguards import InterruptCallback, Interrupted, NonFiniteError, oom_advice
    from align.core.tracking import is_main_process
    from align.rlhf.distributed import world

    t = cfg.train
    ranks = world()
    interrupt = InterruptCallback()
    interrupt.install()
    step_in_progress = start  # the held-out evaluation before the first step counts as step `start`
    try:
        def evaluate(step: int) -> dict:
            metrics = eval_fn()
            if on_eval is not None:
                on_eval(step, metrics)
            return metrics

        if start == 0 and eval_fn is not None:
            stage.tracker.log(evaluate(0), step=0)
        for step in tqdm(range(start, total), desc=desc, initial=start, total=total, disable=not is_main_process()):
            step_in_progress = done = stage.step = step + 1
            metrics = step_fn(step)
            if eval_fn is not None and t.eval_steps and done % t.eval_steps == 0 and done < total:
                metrics.update(evaluate(done))
            if (done % t.logging_steps == 0 or done == total) and ranks.main:
                log.info("%s step %d: %s", desc, done, describe(done, metrics))
            stage.tracker.log(metrics, step=done)  # rank 0's tracker; the metrics are the global batch's
            saved = None
            if t.save_steps and done % t.save_steps == 0:
                saved = save_fn(done)  # every rank: a checkpoint holds each rank's random state
            if ranks.any(bool(interrupt.signal_name)):  # a signal may reach the ranks a step apart: they stop together
                interrupt.signal_name = interrupt.signal_name or "SIGTERM"
                folder = saved or save_fn(done)
                raise Interrupted(
                    f"{interrupt.signal_name} at step {done}; checkpoint saved in {folder}; continue with --resume (resume=true)",
                    exit_code=interrupt.exit_code,
                )
        step_in_progress = total
        final = evaluate(total) if eval_fn is not None else {}
        stage.tracker.log(final, step=total)
        return final
    except torch.cuda.OutOfMemoryError as exc:
        raise AlignError(oom_advice(cfg, step_in_progress)) from exc
    except NonFiniteError as exc:
        checkpoint = latest_complete(stage.run_dir.path)
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
        raise NonFiniteError(f"{exc} at step {step_in_progress}; training stopped before applying it; {kept}") from None
    finally:
        interrupt.uninstall()


def logged_at_step(run_dir, step: int) -> dict:
    """Every metric the run logged at `step` (metrics.jsonl), merged: e.g. the step-0 evaluation of a resumed run."""
    out: dict = {}
    path = run_dir.metrics_path
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("_step") == step:
                out.update(row)
    return out


def notify_train_end(callbacks, model) -> None:
    """`on_train_end(model=...)` of TrainerCallback-style callbacks, on every rank, once training ended (the
    online stages run their own loops, not the HF Trainer's; a caller sees the trained model as the Trainer shows it)."""
    for callback in callbacks:
        hook = getattr(callback, "on_train_end", None)
        if hook is not None:
            hook(None, None, None, model=model)


# --------------------------------------------------------------------------- which prompts a step takes


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_prompts(prompts: list[list[dict]], step: int, size: int, seed: int) -> list[list[dict]]:
    """The prompts of a step: a fresh seeded permutation per pass over the data (resumable by step)."""
    start = step * size
    picked = []
    for i in range(start, start + size):
        epoch, pos = divmod(i, len(prompts))
        picked.append(prompts[prompt_order(len(prompts), seed, epoch)[pos]])
    return picked

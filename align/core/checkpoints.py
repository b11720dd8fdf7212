"""Training checkpoints that a crash cannot corrupt, and resuming from them.

The HF Trainer writes `checkpoints/checkpoint-N/` (adapter, optimizer, scheduler, RNG
states, trainer state with the data position) file by file. A process killed halfway
leaves a directory that looks like a checkpoint. So a checkpoint counts only once a
`COMPLETE` marker is written into it, after every rank has finished writing; resuming
takes the newest marked one.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import TrainerCallback

from align.core.artifacts import atomic_write_text
from align.core.tracking import is_main_process

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(run_path: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, complete or not, oldest first."""
    root = Path(run_path) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest_complete(run_path: Path) -> Path | None:
    """The newest checkpoint whose writing finished, or None."""
    complete = [p for _, p in checkpoint_dirs(run_path) if (p / COMPLETE).is_file()]
    return complete[-1] if complete else None


def load_plain(path: Path):
    """A file written with torch.save, read as data only.

    `torch.load(weights_only=True)` unpickles nothing but tensors, storages, torch dtypes/sizes/devices
    and plain containers and scalars (dict, OrderedDict, list, tuple, set, str, bytes, int, float,
    bool, None): what an optimizer, scheduler or RNG state holds. A file that needs anything else
    (a class or function to import and call: how a tampered pickle runs code) is refused with one line.
    """
    import torch

    from align.core.errors import DataError

    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for a forbidden type, others for a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: refused: not a checkpoint of plain data (tensors and containers only): {first[:200]}") from None


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class MarkCompleteCallback(TrainerCallback):
    """Writes COMPLETE into a checkpoint once the Trainer has saved all of it (on every rank)."""

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # each rank writes its own RNG state; wait for all of them
        if is_main_process():
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_text(folder / COMPLETE, f"step {state.global_step}\n")
        _barrier()

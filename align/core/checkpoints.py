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

from align.core.files import atomic_write_text
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


def load_plain(path: Path, numpy_arrays: bool = False, mmap: bool = False):
    """A file written with torch.save, read as data only.

    `torch.load(weights_only=True)` unpickles nothing but tensors, storages, torch dtypes/sizes/devices
    and plain containers and scalars (dict, OrderedDict, list, tuple, set, str, bytes, int, float,
    bool, None): what an optimizer, scheduler or RNG state holds; `numpy_arrays` also allows numpy
    arrays and dtypes (the NumPy generator state in the HF trainer's rng_state.pth); `mmap` maps the tensors
    bytes instead of reading them (a check of what a file holds, not a load). A file that needs
    anything else (a class or function to import and call: how a tampered pickle runs code) is refused
    with one line naming the file and what it asked for.
    """
    import contextlib

    import torch

    from align.core.errors import DataError

    allowed = torch.serialization.safe_globals(_numpy_globals()) if numpy_arrays else contextlib.nullcontext()
    try:
        with allowed:
            try:
                return torch.load(path, weights_only=True, mmap=mmap)
            except RuntimeError as exc:  # a file in torch's legacy (non-zip) format cannot be mapped: read it
                if not mmap or "zipfile" not in str(exc):
                    raise
                return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for a forbidden type, others for a damaged file
        raise DataError(f"{path}: refused: not a checkpoint of plain data: {_why_refused(exc)}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _why_refused(exc: Exception) -> str:
    """torch's refusal in a few words: which global the pickle asked for (torch's own text carries terminal
    colours and advice on loading the file anyway, which align never does)."""
    text = _ANSI.sub("", str(exc))
    asked = re.search(r"(?:Unsupported global|GLOBAL) ([\w.]+)", text) or re.search(r"global ([\w.]+)", text)
    if asked:
        return f"a pickle that imports and calls {asked.group(1)} (code, not tensors); align never loads such a file"
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"cannot be read as tensors and plain containers ({type(exc).__name__}: {first[:160]})"


def _numpy_globals() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def check_plain_checkpoint(folder: Path) -> None:
    """Every torch.save file of a checkpoint (optimizer, scheduler, scaler, RNG states) loads as plain data;
    checked before a resume changes anything, so a tampered file is refused with the run left as it was."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in (".pt", ".pth"):
            load_plain(path, numpy_arrays=path.name.startswith("rng_state"), mmap=True)


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

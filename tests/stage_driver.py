"""Runs one stage in a subprocess (plain python or torchrun) and records what tests need.

usage: python tests/stage_driver.py <stage> <overrides.json> <record dir>

Each rank saves its trainable (adapter) weights at the end of training to
<record dir>/rank<R>.pt, and every LoRA weight of every adapter (trainable or frozen, e.g. a reward
adapter) to <record dir>/rank<R>-lora.pt, so a test can compare ranks and runs.

ALIGN_TEST_KILL_AFTER_CHECKPOINT=<step>: rank 0 kills itself (SIGKILL, as a crash or `kill -9`
would) right after the online stages' checkpoint of that step is written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from align.cli.recipes import setup_logging  # noqa: E402
from align.stages.registry import load_stage_config, run_stage  # noqa: E402


class SaveTrainable(TrainerCallback):
    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        weights = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(weights, self.folder / f"rank{rank}.pt")
        lora = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
        torch.save(lora, self.folder / f"rank{rank}-lora.pt")


def kill_after_checkpoint(step: int) -> None:
    import signal

    from align.rlhf import loop

    original = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        folder = original(*args, **kwargs)
        if args[1] == step and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return folder

    loop.save_checkpoint = save_then_die


def main() -> int:
    stage, overrides, record = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    record.mkdir(parents=True, exist_ok=True)
    setup_logging()
    if os.environ.get("ALIGN_TEST_KILL_AFTER_CHECKPOINT"):
        kill_after_checkpoint(int(os.environ["ALIGN_TEST_KILL_AFTER_CHECKPOINT"]))
    cfg = load_stage_config(stage, None, overrides)
    run_stage(cfg, callbacks=[SaveTrainable(record)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training stages. Each module has `run(cfg, force=False) -> RunDir`.

Imported lazily: config errors are reported before torch and TRL load.
"""

from __future__ import annotations

import importlib

STAGES = ("sft", "dpo", "reward", "ppo", "eval")


def runner(stage: str):
    """The `run` function of a stage module."""
    if stage not in STAGES:
        raise KeyError(stage)
    return importlib.import_module(f"align.stages.{stage}").run

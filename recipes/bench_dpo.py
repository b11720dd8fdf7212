#!/usr/bin/env python
"""DPO speed and memory, side by side in one process: stock TRL, tuned TRL, and our DPO stage.

    python recipes/bench_dpo.py                                   # CPU: embedded model, demo data
    python recipes/bench_dpo.py --shape llama-1b --data synthetic  # GPU: random-init Llama ~1B
    python recipes/bench_dpo.py --shape llama-8b --data synthetic --quantization 4bit --find-max-batch

Variants, run one after the other on the same model, data, batch, max_length, seed, precision,
LoRA config and learning-rate schedule:
  a        stock TRL: DPOTrainer + PEFT LoRA, TRL's defaults for every speed knob
           (gradient checkpointing on, reference forward every step, no Liger)
  b        TRL tuned by hand: precompute_ref_log_probs, gradient checkpointing off,
           use_liger_kernel on CUDA (the precompute pass is timed and reported apart)
  c        our DPO stage's trainer (align.stages.dpo.build_trainer) with its defaults; its
           reference cache starts empty, so every step still runs the reference forward
  c-warm   the same with the cache filled by the c run: a rerun, another epoch or a beta sweep
  c-plain  (ablation, opt-in) our stage with dpo.shared_prefix and dpo.ref_cache off: what the
           stage's other defaults (no gradient checkpointing) give on TRL's layout
LoRA dropout is 0 for all: dropout masks are random, and the correctness check compares
per-step values. Each variant sees each pair once (steps x batch pairs), in the same order.

Printed per variant: median step time after warm-up, pairs/s, tokens/s (tokens: each pair's
prompt + chosen + rejected, unpadded, the same count for every variant), peak memory (CUDA max
allocated on GPU, peak RSS on CPU, reset per variant), the loss after N steps, and on GPU the
achieved TFLOP/s: model FLOPs per token = 2 * params (policy forward) + 2 * params (backward to
the activations; LoRA weight gradients are negligible) + 2 * params (reference forward), over
the same token count, against a bf16 matmul measured in the same run. Then the ratios.
Correctness (fp32 only): c's per-step loss and chosen/rejected rewards against a's, first 5 steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import torch  # noqa: E402

SHAPES = {  # random-init Llama shapes (vocabulary of the Llama 3 tokenizer size)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
CHECK_STEPS = 5
TOLERANCE = 1e-4


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES])
    p.add_argument("--data", default="demo", choices=["demo", "synthetic"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-length", type=int, default=None, help="default: 256 (demo), 1,800 (synthetic)")
    p.add_argument("--variants", default="a,b,c,c-warm")
    p.add_argument("--quantization", default="none", choices=["none", "4bit"])
    p.add_argument("--find-max-batch", action="store_true", help="GPU: double the batch of c until it no longer fits")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


# --------------------------------------------------------------------------- data


def demo_pairs(n: int) -> list[dict]:
    from align.core.data import load_splits
    from align.core.config import DataConfig

    splits = load_splits(DataConfig(path="bundled:demo-prefs"), "preference", 0)  # train split, file order
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in splits.train]
    if len(rows) < n:
        raise SystemExit(f"demo data has {len(rows)} pairs; --steps/--batch ask for {n}")
    return rows[:n]


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Pairs with log-uniform lengths: prompts 20-1,000 tokens, responses 50-800, chosen != rejected.

    Words are common English words that are one token each in Llama/SmolLM tokenizers, so the
    word counts are close to the token counts (the measured lengths are printed).
    """
    import random

    words = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
             "word but not what all were we when your can said there use an each which she do how their if will up "
             "other about out many then them these so some her would make like him into time has look two more write "
             "go see number no way could people my than first water been call who oil its now find long down day did").split()
    rng = random.Random(seed)

    def length(lo, hi):
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    return [
        {
            "prompt": [{"role": "user", "content": text(length(20, 1000))}],
            "chosen": [{"role": "assistant", "content": text(length(50, 800))}],
            "rejected": [{"role": "assistant", "content": text(length(50, 800))}],
        }
        for _ in range(n)
    ]


# --------------------------------------------------------------------------- model


def build_base(args, device: str, workdir: Path):
    """(model factory, tokenizer, align ModelConfig) for the chosen shape; each factory call loads a fresh copy."""
    from align.core.config import ModelConfig
    from align.modeling.models import load_model, load_tokenizer, resolve

    if args.shape == "embedded":
        ref = resolve("smollm2-135m-instruct")
        mcfg = ModelConfig(name_or_path="smollm2-135m-instruct", quantization=args.quantization)
    else:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from align.modeling.models import ModelRef

        folder = workdir / args.shape
        tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct").location)
        config = LlamaConfig(**{**SHAPES[args.shape], "vocab_size": max(SHAPES[args.shape]["vocab_size"], len(tokenizer))},
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device("cpu"):
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        ref = ModelRef(str(folder), str(folder), True)
        mcfg = ModelConfig(name_or_path=str(folder), quantization=args.quantization)
    tokenizer = load_tokenizer(ref, mcfg)
    return (lambda: load_model(ref, mcfg, device)), tokenizer, mcfg


def matmul_ceiling_tflops(device: str) -> float | None:
    """Best bf16 matmul throughput on this GPU, measured now (8192^3, 20 repeats)."""
    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 8192**3 / best / 1e12


# --------------------------------------------------------------------------- variants


class StepTimer:
    """Wall time of every optimizer step, and the per-step logged loss and rewards."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.seconds.append(time.perf_counter() - timer._start)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.logs.append({k: logs.get(k) for k in ("loss", "rewards/chosen", "rewards/rejected")})

        self.callback = Callback()
        self.seconds: list[float] = []
        self.logs: list[dict] = []


def run_variant(name, args, cfg, make_model, tokenizer, train_ds, workdir, cache_dir, device):
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from align.modeling.adapters import peft_config_for
    from align.core.artifacts import RunDir
    from align.stages.common import peak_memory_mb, reset_peak_memory, trainer_kwargs
    from align.stages.dpo import build_trainer

    run_dir = RunDir(workdir / name)
    timer = StepTimer()
    reset_peak_memory()
    model = make_model()
    torch.manual_seed(cfg.train.seed)  # the same adapter initialization for every variant
    setup_start = time.perf_counter()
    if name.startswith("c"):
        cfg = copy.deepcopy(cfg)
        cfg.dpo.ref_cache_dir = str(cache_dir)
        if name == "c-plain":  # the ablation: our stage's settings, TRL's layout, no cache
            cfg.dpo.shared_prefix = cfg.dpo.ref_cache = False
        trainer = build_trainer(cfg, model, tokenizer, train_ds, None, run_dir, callbacks=[timer.callback])
    else:
        common = trainer_kwargs(cfg, run_dir, device, has_eval=False)
        if name == "a":  # TRL's own defaults for its speed knobs
            defaults = {f.name: f.default for f in dataclasses.fields(TRLDPOConfig)}
            speed = {k: defaults[k] for k in ("gradient_checkpointing", "precompute_ref_log_probs", "use_liger_kernel")}
        else:
            speed = dict(gradient_checkpointing=False, precompute_ref_log_probs=True,
                         use_liger_kernel=device.startswith("cuda") and _liger_available())
        from align.dpo.options import trl_loss_args

        trl_args = TRLDPOConfig(**{**common, **speed}, **trl_loss_args(cfg.dpo), dataset_num_proc=None)
        trainer = DPOTrainer(model=model, args=trl_args, train_dataset=train_ds, processing_class=tokenizer,
                             peft_config=peft_config_for(cfg, base_location=model.name_or_path),
                             callbacks=[timer.callback])
    setup_s = time.perf_counter() - setup_start  # b: includes the reference precompute pass
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # the harness prints its own summary
        trainer.remove_callback(quiet)
    trainer.train()
    steps = timer.seconds[args.warmup:]
    median = statistics.median(steps)
    result = {
        "variant": name,
        "median_step_s": median,
        "pairs_per_s": cfg.train.batch_size / median,
        "setup_s": setup_s,
        "peak_memory_mb": peak_memory_mb(),
        "loss_last": timer.logs[-1]["loss"],
        "per_step": timer.logs,
        "step_s": timer.seconds,
        "total_train_s": sum(timer.seconds),
    }
    if name.startswith("c"):
        result["fast_path"] = trainer.fast_path.describe()
        if trainer.ref_cache is not None:
            result["cache_hits"], result["cache_misses"] = trainer.ref_cache.hits, trainer.ref_cache.misses
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def largest_batch(args, cfg, make_model, tokenizer, workdir, device) -> int:
    """Double the batch of variant c (2 steps each) until a step runs out of GPU memory."""
    import datasets

    batch, fits = cfg.train.batch_size, None
    while True:
        probe = copy.deepcopy(cfg)
        probe.train.batch_size, probe.train.max_steps = batch, 2
        rows = synthetic_pairs(2 * batch, seed=1) if args.data == "synthetic" else demo_pairs(2 * batch)
        probe_args = argparse.Namespace(**{**vars(args), "warmup": 0})
        try:
            run_variant("c", probe_args, probe, make_model, tokenizer, datasets.Dataset.from_list(rows),
                        workdir / f"probe-{batch}", workdir / f"probe-cache-{batch}", device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if fits is None:
                raise SystemExit(f"batch {batch} does not fit; start lower with --batch")
            return fits
        fits, batch = batch, batch * 2


def _liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def workload(args, tokenizer, max_length):
    """The pairs every variant trains on, their token lengths, and the tokens of each step.

    A step's tokens: each pair's prompt + chosen + rejected after truncation at max_length
    (prompt counted once), the same count for every variant.
    """
    import datasets

    n_pairs = (args.warmup + args.steps) * args.batch
    rows = demo_pairs(n_pairs) if args.data == "demo" else synthetic_pairs(n_pairs, seed=0)
    lengths = pair_tokens(tokenizer, rows)
    per_pair = [min(p + c, max_length) + min(p + r, max_length) - min(p, max_length) for p, c, r in lengths]
    per_step = [sum(per_pair[i:i + args.batch]) for i in range(0, n_pairs, args.batch)]
    return datasets.Dataset.from_list(rows), lengths, per_step


def non_embedding_params(mcfg) -> int:
    """Parameters outside the embeddings, counted on a weightless (meta) copy: no load, no quantization packing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.modeling.models import resolve

    config = AutoConfig.from_pretrained(resolve(mcfg.name_or_path).location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def pair_tokens(tokenizer, rows) -> list[tuple[int, int, int]]:
    def n(messages, gen=False):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"])

    out = []
    for r in rows:
        p = n(r["prompt"], gen=True)
        out.append((p, n(r["prompt"] + r["chosen"]) - p, n(r["prompt"] + r["rejected"]) - p))
    return out


def main() -> int:
    args = parse_args()
    import datasets
    import transformers
    import trl
    import peft

    from align.core.config import load_config
    from align.stages.dpo import DPOConfig
    from align.modeling.models import default_device

    device = default_device()
    max_length = args.max_length or (256 if args.data == "demo" else 1800)
    n_pairs = (args.warmup + args.steps) * args.batch
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    make_model, tokenizer, mcfg = build_base(args, device, workdir)
    train_ds, lengths, tokens_per_step = workload(args, tokenizer, max_length)
    cfg = load_config(DPOConfig, Path(__file__).parent / "configs/smollm2-135m/dpo.yaml", {
        "parent_run": None, "model.name_or_path": mcfg.name_or_path, "model.quantization": args.quantization,
        "peft.method": "qlora" if args.quantization == "4bit" else "lora", "lora.dropout": 0.0,
        "train.batch_size": args.batch, "train.max_steps": args.warmup + args.steps, "train.max_length": max_length,
        "train.logging_steps": 1, "train.save_steps": None, "output_dir": str(workdir / "unused"),
    })

    n_params = non_embedding_params(mcfg)
    ceiling = matmul_ceiling_tflops(device)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU, %d threads' % torch.get_num_threads()})")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"peft {peft.__version__}, datasets {datasets.__version__}")
    print(f"model: {args.shape} ({n_params / 1e6:.0f} M non-embedding params), {mcfg.quantization}, "
          f"precision {cfg.model.dtype} -> {'bf16' if device.startswith('cuda') else 'fp32'}; data: {args.data}, "
          f"{n_pairs} pairs, batch {args.batch}, max_length {max_length}, {args.warmup} warm-up + {args.steps} timed steps")
    ps, cs, rs = zip(*lengths)
    print(f"tokens per pair: prompt {min(ps)}-{max(ps)} (mean {statistics.mean(ps):.0f}), chosen {min(cs)}-{max(cs)} "
          f"(mean {statistics.mean(cs):.0f}), rejected {min(rs)}-{max(rs)} (mean {statistics.mean(rs):.0f})")
    if ceiling:
        print(f"bf16 matmul ceiling (8192^3, measured now): {ceiling:.0f} TFLOP/s")

    if args.find_max_batch:
        args.batch = largest_batch(args, cfg, make_model, tokenizer, workdir, device)
        print(f"largest batch that fits (variant c, doubling from {cfg.train.batch_size}): {args.batch}")
        train_ds, lengths, tokens_per_step = workload(args, tokenizer, max_length)
        cfg.train.batch_size, cfg.train.max_steps = args.batch, args.warmup + args.steps

    cache_dir = workdir / "ref-cache"
    results = []
    for name in args.variants.split(","):
        print(f"\n--- {name} ---", flush=True)
        result = run_variant(name, args, cfg, make_model, tokenizer, train_ds, workdir, cache_dir, device)
        timed = tokens_per_step[args.warmup:]
        result["tokens_per_s"] = statistics.mean(timed) / result["median_step_s"]
        if ceiling:
            result["tflops"] = 6 * n_params * result["tokens_per_s"] / 1e12
            result["share_of_ceiling"] = result["tflops"] / ceiling
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("per_step", "step_s")}), flush=True)

    print_table(results, ceiling)
    ok = check(results)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))
    return 0 if ok else 1


def print_table(results, ceiling):
    print("\n| variant | median step (s) | pairs/s | tokens/s | peak memory (MB) | loss after N | setup (s) |"
          + (" TFLOP/s | share of bf16 ceiling |" if ceiling else ""))
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if ceiling else ""))
    for r in results:
        row = (f"| {r['variant']} | {r['median_step_s']:.2f} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
               f"{r['peak_memory_mb']:.0f} | {r['loss_last']:.4f} | {r['setup_s']:.1f} |")
        if ceiling:
            row += f" {r['tflops']:.0f} | {r['share_of_ceiling']:.0%} |"
        print(row)
    by = {r["variant"]: r for r in results}
    for mine in ("c", "c-warm", "c-plain"):
        for other in ("a", "b", "c-plain"):
            if mine == other:
                continue
            if mine in by and other in by:
                print(f"{mine} / {other}: {by[mine]['pairs_per_s'] / by[other]['pairs_per_s']:.2f}x pairs/s, "
                      f"peak memory {by[mine]['peak_memory_mb'] / by[other]['peak_memory_mb']:.2f}x")


def check(results) -> bool:
    """c against a, first CHECK_STEPS steps: loss and both rewards within TOLERANCE (fp32)."""
    by = {r["variant"]: r for r in results}
    if "a" not in by or "c" not in by:
        return True
    if torch.cuda.is_available():
        print("correctness: not checked (bf16 on GPU; the check is an fp32 CPU run)")
        return True
    worst = 0.0
    for a, c in zip(by["a"]["per_step"][:CHECK_STEPS], by["c"]["per_step"][:CHECK_STEPS]):
        worst = max([worst] + [abs(a[k] - c[k]) for k in a])
    ok = worst <= TOLERANCE
    print(f"correctness: c vs a, first {CHECK_STEPS} steps, loss and chosen/rejected rewards: "
          f"max abs diff {worst:.2e} ({'PASS' if ok else 'FAIL'}, tolerance {TOLERANCE:g})")
    return ok


if __name__ == "__main__":
    sys.exit(main())

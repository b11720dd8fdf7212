#!/usr/bin/env python
"""DPO speed and memory, side by side in one process: stock TRL, tuned TRL, and our DPO stage.

    python recipes/bench_dpo.py                                   # CPU: embedded model, demo data
    python recipes/bench_dpo.py --shape llama-1b --data synthetic  # GPU: random-init Llama ~1B
    python recipes/bench_dpo.py --shape llama-8b --data synthetic --quantization 4bit --find-max-batch --variants a,c

Variants, run one after the other on the same model, data, batch, max_length, seed, precision,
LoRA config and learning-rate schedule:
  a        stock TRL: DPOTrainer + PEFT LoRA, TRL's defaults for every speed knob
           (gradient checkpointing on, reference forward every step, no Liger)
  b        TRL tuned by hand: precompute_ref_log_probs, gradient checkpointing off,
           use_liger_kernel on CUDA (the precompute pass is timed and reported apart)
  b-pf     b + TRL's padding_free; TRL 1.16 turns it off for DPO (falls back to padding): then
           it is reported as such and not timed
  c        our DPO stage's trainer (align.stages.dpo.build_trainer) with its defaults: on CUDA
           FlexAttention with all pairs of a micro-batch in one row, on the CPU a dense mask;
           gradient checkpointing auto; its reference cache starts empty, so every step still
           runs the reference forward
  c-warm   the same with the cache filled by the c run: a rerun, another epoch or a beta sweep
  c-rows   c with one row per pair (dpo.padding_free false)
  c-sdpa   c with a dense 4D mask under sdpa (dpo.flex_attention false): the fast path as it
           was before FlexAttention
  c-liger  c + train.liger_kernel (Liger's RMSNorm/RoPE/SwiGLU kernels; CUDA)
  c-plain  (ablation) our stage with dpo.shared_prefix and dpo.ref_cache off: what the stage's
           other defaults give on TRL's layout
Liger patches module-level functions of transformers for the rest of the process, so variants
using it (b, b-pf, c-liger) run after all others, whatever the order asked.
LoRA dropout is 0 for all: dropout masks are random, and the correctness check compares
per-step values. Each variant sees each pair once (steps x batch pairs), in the same order.

--find-max-batch (GPU): each variant's largest batch, found on its own trainer: one step on the
longest pairs at --max-batch, halving on out-of-memory down to --batch; then the timed steps at
that batch. A variant that fits --max-batch is reported as ">= cap".

Printed per variant: median step time after warm-up, pairs/s, tokens/s (tokens: each pair's
prompt + chosen + rejected, unpadded, the same count for every variant), peak memory (CUDA max
allocated on GPU, peak RSS on CPU, reset per variant), the loss after N steps, and on GPU the
achieved TFLOP/s: model FLOPs per token = 2 * params (policy forward) + 2 * params (backward to
the activations; LoRA weight gradients are negligible) + 2 * params (reference forward), over
the same token count, against a bf16 matmul measured in the same run. Then the ratios.
Correctness (fp32 only): c's per-step loss and chosen/rejected rewards against a's, first 5 steps.
The JSON (--json) is rewritten after every variant, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
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
VARIANTS = ("a", "b", "b-pf", "c", "c-warm", "c-rows", "c-sdpa", "c-liger", "c-plain")
LIGER_VARIANTS = ("b", "b-pf", "c-liger")
CHECK_STEPS = 5
TOLERANCE = 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES])
    p.add_argument("--data", default="demo", choices=["demo", "synthetic"])
    p.add_argument("--batch", type=int, default=8, help="pairs per step (with --find-max-batch: the smallest tried)")
    p.add_argument("--steps", type=int, default=8, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-length", type=int, default=None, help="default: 256 (demo), 1,800 (synthetic)")
    p.add_argument("--variants", default="a,b,c,c-warm", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--quantization", default="none", choices=["none", "4bit"])
    p.add_argument("--find-max-batch", action="store_true", help="GPU: each variant at its largest batch (see above)")
    p.add_argument("--max-batch", type=int, default=64, help="the cap of --find-max-batch")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "c-warm" in names and ("c" not in names or names.index("c") > names.index("c-warm")):
        p.error("c-warm reads the reference cache that c fills: list c before it")
    # Liger patches transformers' module-level functions for the rest of the process: run its variants last.
    args.order = [n for n in names if n not in LIGER_VARIANTS] + [n for n in names if n in LIGER_VARIANTS]
    return args


# --------------------------------------------------------------------------- data


def demo_pairs(n: int) -> list[dict]:
    from align.core.config import DataConfig
    from align.core.data import load_splits

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


def pair_tokens(tokenizer, rows) -> list[tuple[int, int, int]]:
    def n(messages, gen=False):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"])

    out = []
    for r in rows:
        p = n(r["prompt"], gen=True)
        out.append((p, n(r["prompt"] + r["chosen"]) - p, n(r["prompt"] + r["rejected"]) - p))
    return out


@dataclasses.dataclass
class Workload:
    """The pairs a variant's trainer is built on: probe pairs (--find-max-batch) first, then timed pairs."""

    rows: list[dict]
    n_probe: int
    lengths: list[tuple[int, int, int]]  # per row: prompt, chosen, rejected tokens
    max_length: int

    def tokens(self, i: int) -> int:
        """A pair's tokens after truncation at max_length, prompt counted once."""
        p, c, r = self.lengths[i]
        m = self.max_length
        return min(p + c, m) + min(p + r, m) - min(p, m)

    def probe_indices(self, batch: int) -> list[int]:
        """The `batch` longest probe pairs: the step that needs the most memory."""
        ranked = sorted(range(self.n_probe), key=self.tokens, reverse=True)
        return ranked[:batch]

    def timed_indices(self, n: int) -> list[int]:
        return list(range(self.n_probe, self.n_probe + n))


def workload(args, tokenizer, max_length: int) -> Workload:
    cap = args.max_batch if args.find_max_batch else args.batch
    n_timed = (args.warmup + args.steps) * cap
    n_probe = cap if args.find_max_batch else 0
    if args.data == "demo":
        rows = demo_pairs(n_probe + n_timed)
    else:  # the timed pairs are the same for every cap; the probe pairs come from another seed
        rows = synthetic_pairs(n_probe, seed=1) + synthetic_pairs(n_timed, seed=0)
    return Workload(rows, n_probe, pair_tokens(tokenizer, rows), max_length)


# --------------------------------------------------------------------------- model


def build_base(args, device: str, workdir: Path):
    """(model factory, tokenizer, align ModelConfig) for the chosen shape; each factory call loads a fresh copy.

    A shape is initialized where it will run (on the GPU, in bf16: seconds for 8B, where a CPU
    fp32 init takes minutes) and saved once; each variant then loads it as the stage would.
    """
    from align.core.config import ModelConfig
    from align.modeling.models import ModelRef, load_model, load_tokenizer, resolve

    if args.shape == "embedded":
        ref = resolve("smollm2-135m-instruct")
        mcfg = ModelConfig(name_or_path="smollm2-135m-instruct", quantization=args.quantization)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        folder = workdir / args.shape
        tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct").location)
        config = LlamaConfig(**{**SHAPES[args.shape], "vocab_size": max(SHAPES[args.shape]["vocab_size"], len(tokenizer))},
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, max_position_embeddings=4096)
        start = time.perf_counter()
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"model: {args.shape} initialized on {device} in {dtype} and saved in {time.perf_counter() - start:.1f} s",
              flush=True)
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


def non_embedding_params(mcfg) -> int:
    """Parameters outside the embeddings, counted on a weightless (meta) copy: no load, no quantization packing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.modeling.models import resolve

    config = AutoConfig.from_pretrained(resolve(mcfg.name_or_path).location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


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
        self.reset()

    def reset(self):
        self.seconds: list[float] = []
        self.logs: list[dict] = []


def variant_config(name: str, cfg, cache_dir: Path):
    """Our stage's config for a c-variant."""
    cfg = copy.deepcopy(cfg)
    cfg.dpo.ref_cache_dir = str(cache_dir)
    if name == "c-rows":
        cfg.dpo.padding_free = False
    elif name == "c-sdpa":
        cfg.dpo.flex_attention = False
    elif name == "c-liger":
        cfg.train.liger_kernel = True
    elif name == "c-plain":
        cfg.dpo.shared_prefix = cfg.dpo.ref_cache = False
    return cfg


def build_variant(name, cfg, model, tokenizer, train_ds, run_dir, cache_dir, device, timer):
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from align.modeling.adapters import peft_config_for
    from align.modeling.train_setup import trainer_kwargs
    from align.stages.dpo import build_trainer

    torch.manual_seed(cfg.train.seed)  # the same adapter initialization for every variant
    if name.startswith("c"):
        trainer = build_trainer(variant_config(name, cfg, cache_dir), model, tokenizer, train_ds, None, run_dir,
                                callbacks=[timer.callback])
    else:
        common = trainer_kwargs(cfg, run_dir, device, has_eval=False, model=model, rows_per_example=2)
        if name == "a":  # TRL's own defaults for its speed knobs
            defaults = {f.name: f.default for f in dataclasses.fields(TRLDPOConfig)}
            speed = {k: defaults[k] for k in ("gradient_checkpointing", "precompute_ref_log_probs", "use_liger_kernel")}
        else:
            speed = dict(gradient_checkpointing=False, precompute_ref_log_probs=True,
                         use_liger_kernel=device.startswith("cuda") and _liger_available())
            speed["padding_free"] = name == "b-pf"
        from align.preference.dpo_options import trl_loss_args

        trl_args = TRLDPOConfig(**{**common, **speed}, **trl_loss_args(cfg.dpo), dataset_num_proc=None)
        trainer = DPOTrainer(model=model, args=trl_args, train_dataset=train_ds, processing_class=tokenizer,
                             peft_config=peft_config_for(cfg, base_location=model.name_or_path),
                             callbacks=[timer.callback])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # the harness prints its own summary
        trainer.remove_callback(quiet)
    return trainer


def train_on(trainer, dataset, batch: int, steps: int) -> None:
    """`steps` optimizer steps of `batch` pairs from `dataset` (already prepared by the trainer)."""
    trainer.train_dataset = dataset
    trainer.args.per_device_train_batch_size = batch
    trainer._train_batch_size = batch  # what HF Trainer's dataloader reads
    trainer.args.max_steps = steps
    trainer.optimizer = trainer.lr_scheduler = None  # fresh for this run's steps
    trainer.accelerator.free_memory()  # drop the optimizers of earlier runs, which accelerate keeps a hold of
    trainer.train()


def out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, as torch raises it or as a library reports it (cuBLAS, bitsandbytes)."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text))


def fits(trainer, dataset, batch: int) -> bool:
    """Whether one step of `batch` pairs runs without a CUDA out-of-memory error."""
    try:
        train_on(trainer, dataset, batch, 1)
        return True
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.accelerator.free_memory()
    gc.collect()
    torch.cuda.empty_cache()
    return False


def largest_batch(trainer, prepared, work: Workload, smallest: int, cap: int) -> tuple[int, bool]:
    """(largest batch that fits on the longest probe pairs, whether it is the cap): top-down, halving."""
    batch = cap
    while batch >= smallest:
        start = time.perf_counter()
        ok = fits(trainer, prepared.select(work.probe_indices(batch)), batch)
        print(f"  batch {batch}: {'fits' if ok else 'out of memory'} ({time.perf_counter() - start:.1f} s)", flush=True)
        if ok:
            return batch, batch == cap
        batch //= 2
    raise SystemExit(f"batch {smallest} does not fit; start lower with --batch")


def run_variant(name, args, cfg, make_model, tokenizer, work: Workload, workdir, cache_dir, device) -> dict:
    from align.core.memory import peak_memory_mb, reset_peak_memory

    run_dir_path = workdir / name
    from align.core.artifacts import RunDir

    timer = StepTimer()
    reset_peak_memory()
    model = make_model()
    setup_start = time.perf_counter()
    build_cfg = copy.deepcopy(cfg)
    if args.find_max_batch:  # gradient checkpointing auto decides for the largest batch tried
        build_cfg.train.batch_size = args.max_batch
    train_ds = _dataset(work.rows)
    trainer = build_variant(name, build_cfg, model, tokenizer, train_ds, RunDir(run_dir_path), cache_dir, device, timer)
    setup_s = time.perf_counter() - setup_start  # b: includes the reference precompute pass
    result = {"variant": name, "setup_s": setup_s}
    if name == "b-pf" and not getattr(trainer, "padding_free", False):
        import trl

        result["skipped"] = f"TRL {trl.__version__} turns padding_free off for DPO (falls back to padding)"
        _free(trainer, model)
        return result
    prepared = trainer.train_dataset
    if len(prepared) != len(work.rows):
        raise SystemExit(f"TRL kept {len(prepared)} of {len(work.rows)} pairs; the bench needs them all")

    batch, at_cap = args.batch, False
    if args.find_max_batch:
        print(f"  largest batch of {name}, longest pairs first, from {args.max_batch} down:", flush=True)
        batch, at_cap = largest_batch(trainer, prepared, work, args.batch, args.max_batch)
        timer.reset()
        reset_peak_memory()
    n_steps = args.warmup + args.steps
    used = work.timed_indices(n_steps * batch)
    train_on(trainer, prepared.select(used), batch, n_steps)

    steps = timer.seconds[args.warmup:]
    median = statistics.median(steps)
    result.update({
        "batch": batch,
        "batch_is_cap": at_cap,
        "median_step_s": median,
        "pairs_per_s": batch / median,
        "tokens_per_s": statistics.mean(work.tokens(i) for i in used) * batch / median,
        "peak_memory_mb": peak_memory_mb(),
        "loss_last": timer.logs[-1]["loss"] if timer.logs else None,
        "per_step": timer.logs,
        "step_s": timer.seconds,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "liger": bool(trainer.args.use_liger_kernel),
    })
    if name.startswith("c"):
        result["fast_path"] = trainer.fast_path.describe()
        if trainer.ref_cache is not None:
            result["cache_hits"], result["cache_misses"] = trainer.ref_cache.hits, trainer.ref_cache.misses
    _free(trainer, model)
    return result


def _dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _free(trainer, model):
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    import datasets
    import peft
    import transformers
    import trl

    from align.core.config_loader import load_config
    from align.modeling.models import default_device
    from align.stages.dpo import DPOConfig

    device = default_device()
    if args.find_max_batch and not device.startswith("cuda"):
        raise SystemExit("--find-max-batch needs a CUDA device (it probes for out-of-memory errors)")
    max_length = args.max_length or (256 if args.data == "demo" else 1800)
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    make_model, tokenizer, mcfg = build_base(args, device, workdir)
    work = workload(args, tokenizer, max_length)
    cfg = load_config(DPOConfig, Path(__file__).parent / "configs/smollm2-135m/dpo.yaml", {
        "parent_run": None, "model.name_or_path": mcfg.name_or_path, "model.quantization": args.quantization,
        "peft.method": "qlora" if args.quantization == "4bit" else "lora", "lora.dropout": 0.0,
        "train.batch_size": args.batch, "train.max_steps": args.warmup + args.steps, "train.max_length": max_length,
        "train.logging_steps": 1, "train.save_steps": None, "output_dir": str(workdir / "unused"),
    })

    n_params = non_embedding_params(mcfg)
    ceiling = matmul_ceiling_tflops(device)
    header = {
        "device": f"{device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU, %d threads' % torch.get_num_threads()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__, "datasets": datasets.__version__},
        "shape": args.shape, "non_embedding_params": n_params, "quantization": mcfg.quantization,
        "ceiling_tflops": ceiling,
    }
    print(f"device: {header['device']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    batch_text = f"largest batch up to {args.max_batch}" if args.find_max_batch else f"batch {args.batch}"
    print(f"model: {args.shape} ({n_params / 1e6:.0f} M non-embedding params), {mcfg.quantization}, "
          f"precision {'bf16' if device.startswith('cuda') else 'fp32'}; data: {args.data}, {batch_text}, "
          f"max_length {max_length}, {args.warmup} warm-up + {args.steps} timed steps")
    timed = work.lengths[work.n_probe:]
    ps, cs, rs = zip(*timed)
    print(f"tokens per pair: prompt {min(ps)}-{max(ps)} (mean {statistics.mean(ps):.0f}), chosen {min(cs)}-{max(cs)} "
          f"(mean {statistics.mean(cs):.0f}), rejected {min(rs)}-{max(rs)} (mean {statistics.mean(rs):.0f})")
    if ceiling:
        print(f"bf16 matmul ceiling (8192^3, measured now): {ceiling:.0f} TFLOP/s")
    if args.order != args.variants.split(","):
        print(f"order: {', '.join(args.order)} (Liger patches transformers for the rest of the process: its variants last)")

    cache_dir = workdir / "ref-cache"
    results = []
    for name in args.order:
        print(f"\n--- {name} ---", flush=True)
        try:
            result = run_variant(name, args, cfg, make_model, tokenizer, work, workdir, cache_dir, device)
        except Exception as exc:  # noqa: BLE001 - one variant failing must not cost the others' figures
            import traceback

            traceback.print_exc()
            result = {"variant": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if ceiling and "median_step_s" in result:
            result["tflops"] = 6 * n_params * result["tokens_per_s"] / 1e12
            result["share_of_ceiling"] = result["tflops"] / ceiling
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("per_step", "step_s")}), flush=True)
        if args.json:
            write_json(args, header, results)

    print_table(results, ceiling)
    ok = check(results)
    if args.json:
        write_json(args, header, results, ratios=ratios(results), correctness_ok=ok)
    failed = [r["variant"] for r in results if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 0 if ok and not failed else 1


def write_json(args, header, results, **extra):
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **header,
               "results": results, **extra}
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(args.json)


def ratios(results) -> list[dict]:
    """Each c-variant against a, b and the c-variants after it: pairs/s and peak memory, measured in this run."""
    by = {r["variant"]: r for r in results if "median_step_s" in r}
    ours = [n for n in VARIANTS if n.startswith("c") and n in by]
    out = []
    for i, mine in enumerate(ours):
        for other in [n for n in ("a", "b") if n in by] + ours[i + 1:]:
            out.append({"mine": mine, "other": other,
                        "pairs_per_s": by[mine]["pairs_per_s"] / by[other]["pairs_per_s"],
                        "peak_memory": by[mine]["peak_memory_mb"] / by[other]["peak_memory_mb"]})
    return out


def print_table(results, ceiling):
    print("\n| variant | batch | median step (s) | pairs/s | tokens/s | peak memory (MB) | loss after N | setup (s) | "
          "grad ckpt |" + (" TFLOP/s | share of bf16 ceiling |" if ceiling else ""))
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |" + (" ---: | ---: |" if ceiling else ""))
    for r in results:
        if "skipped" in r or "error" in r:
            print(f"| {r['variant']} | {r.get('skipped') or 'error: ' + r['error']} |")
            continue
        batch = f">={r['batch']} (cap)" if r.get("batch_is_cap") else str(r["batch"])
        loss = f"{r['loss_last']:.4f}" if r["loss_last"] is not None else "n/a"
        row = (f"| {r['variant']} | {batch} | {r['median_step_s']:.2f} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
               f"{r['peak_memory_mb']:.0f} | {loss} | {r['setup_s']:.1f} | {'on' if r['gradient_checkpointing'] else 'off'} |")
        if ceiling:
            row += f" {r['tflops']:.0f} | {r['share_of_ceiling']:.0%} |"
        print(row)
    for r in results:
        if r.get("fast_path"):
            print(f"{r['variant']}: {r['fast_path']}")
    for x in ratios(results):
        print(f"{x['mine']} / {x['other']}: {x['pairs_per_s']:.2f}x pairs/s, peak memory {x['peak_memory']:.2f}x")


def check(results) -> bool:
    """c against a, first CHECK_STEPS steps: loss and both rewards within TOLERANCE (fp32)."""
    by = {r["variant"]: r for r in results if "per_step" in r}
    if "a" not in by or "c" not in by or by["a"]["batch"] != by["c"]["batch"]:
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

#!/usr/bin/env python
"""GRPO speed, side by side in one run: our GRPO stage's step and TRL's GRPOTrainer on the same task.

    python recipes/bench_online.py                     # CPU: the embedded SmolLM2-135M, 8 prompts x 4 x 40 tokens
    python recipes/bench_online.py --shape llama-1b    # GPU: a random-init Llama-3.2-1B shape, bf16
    python recipes/bench_online.py --dry-run           # the settings both get; nothing is loaded or run

Both variants get the same model (loaded by align, the same weights, dtype and attention), the
same prompts in the same order (bundled:demo-prefs, --prompts per step), group size, max new
tokens, sampling (temperature 1, top-p 1, no top-k), learning rate (constant), PEFT LoRA (r 16,
alpha 32, dropout 0, all linear layers), KL coefficient (beta 0.04, k3, in the loss, TRL's default
bias correction), loss aggregation (our sequence_mean = TRL's "grpo"), group-scaled advantages,
grad-norm clip 1.0, one optimizer update per step (micro-batch --micro, the rest accumulated), the
same reward (align's reward sources, judges only: the same scorer object type on both sides), and
no vLLM:
  trl   TRL's GRPOTrainer with its defaults for everything else (gradient checkpointing on, its
        own `generate` call, a reference pass with the adapter disabled)
  ours  align.rlhf.group.group_step, as the GRPO stage runs it (its defaults: gradient
        checkpointing auto, the shared decoding loop)
  ours-k3-gradient  (not timed against trl) ours with grpo.kl_bias_correction false: the KL
        gradient our GRPO had before issue 18, for the held-out KL after the same steps
Each variant runs in a child process of its own, so its peak memory (CUDA max allocated on GPU,
peak resident set size on CPU, counted from the first step) is its own. A step is one rollout of
prompts x group responses, their scores and one optimizer update.

Printed per variant: median seconds per step after --warmup steps, responses/s, tokens/s
(prompt + response tokens of every response, unpadded), peak memory, mean response length, and
(--eval-prompts) the held-out KL to the reference and reward after the last step, measured the same
way for both (align.rlhf.rewards.held_out_metrics: one seeded sample per held-out prompt). Then the
ratios, and a correctness line: the rewards TRL computed at each step, put through our advantage
code (align.rlhf.estimators.GroupRelative), must give the advantages TRL computed from them.
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

VARIANTS = ("trl", "ours", "ours-k3-gradient")
SHAPES = {  # random-init shapes; the vocabulary is the tokenizer's, so sampled ids decode
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,  # the bench's own test
                 num_key_value_heads=2, tie_word_embeddings=True),
}
REWARDS = [  # judges only: both sides call the same align scorer
    {"judge": "format", "weight": 1.0, "default": 0.0},
    {"judge": "length", "weight": 0.5, "args": {"max_words": 25}},
]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
ADVANTAGE_TOLERANCE = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-tokens", type=int, default=40, help="max new tokens per response")
    p.add_argument("--micro", type=int, default=16, help="responses per micro-batch (the step's rest is accumulated)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for the KL and reward after training (0: none)")
    p.add_argument("--variants", default="trl,ours", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant, write --result
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.order = args.variants.split(",")
    unknown = [v for v in args.order if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    rollout = args.prompts * args.group
    if rollout % args.micro:
        p.error(f"--micro {args.micro} must divide prompts x group ({rollout}): one optimizer update per step")
    return args


# --------------------------------------------------------------------------- shared set-up


def device_name() -> str:
    from align.modeling.models import default_device

    return default_device()


def prompts_for(args, n_steps: int) -> tuple[list, list]:
    """(training prompts, step after step; held-out prompts) from bundled:demo-prefs."""
    from align.core.config import DataConfig
    from align.core.data import distinct_prompts, load_splits

    splits = load_splits(DataConfig(path="bundled:demo-prefs", eval_split="test"), "preference", args.seed)
    train = distinct_prompts(splits.train, len(splits.train))
    need = args.prompts * n_steps
    if len(train) < need:
        raise SystemExit(f"bundled:demo-prefs has {len(train)} distinct training prompts; the steps need {need}")
    return train[:need], distinct_prompts(splits.eval, args.eval_prompts) if args.eval_prompts else []


def stage_config(args, model: str, out: Path, kl_bias_correction: bool = True):
    """Our GRPO stage's config for this task (the TRL side is built from the same values)."""
    from align.core.config_loader import load_config
    from align.stages.grpo import GRPOConfig

    return load_config(GRPOConfig, None, {
        "model.name_or_path": model, "output_dir": str(out), "tracking": "none", "rewards": REWARDS,
        "data.path": "bundled:demo-prefs", "data.eval_split": "test",
        "lora": LORA, "train.learning_rate": args.lr, "train.lr_scheduler": "constant", "train.warmup_ratio": 0.0,
        "train.max_steps": args.warmup + args.steps, "train.batch_size": args.micro,
        "train.gradient_accumulation_steps": args.prompts * args.group // args.micro, "train.max_grad_norm": 1.0,
        "train.seed": args.seed,
        "grpo": {"prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.max_tokens,
                 "temperature": 1.0, "top_p": 1.0, "kl_coef": args.beta, "kl_in": "loss", "kl_estimator": "k3",
                 "kl_bias_correction": kl_bias_correction, "loss_aggregation": "sequence_mean",
                 "scale_advantages": "group", "epochs": 1, "clip_range": 0.2, "eval_prompts": 0},
    })


def prepare_model(args, device: str, workdir: Path) -> str:
    """The model both variants load: the embedded alias, or a random-init shape saved once into workdir."""
    if args.shape == "embedded":
        return "smollm2-135m-instruct"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from align.modeling.models import resolve

    folder = workdir / args.shape
    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct").location)
    config = LlamaConfig(**SHAPES[args.shape], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=4096)
    start = time.perf_counter()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"model: {args.shape} ({n / 1e9:.2f} B params) initialized on {device} in {dtype} and saved in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return str(folder)


def rewards_object(tokenizer):
    from align.rlhf.options import RewardSource
    from align.rlhf.rewards import Rewards

    return Rewards([RewardSource(**s) for s in REWARDS], tokenizer=tokenizer)


def held_out(model, tokenizer, rewards, cfg, prompts, seed: int) -> dict:
    from align.rlhf.group import sampling
    from align.rlhf.rewards import held_out_metrics

    if not prompts:
        return {}
    m = held_out_metrics(model, tokenizer, rewards, prompts, sampling(cfg, 1), seed)
    return {"eval_kl": m["eval/kl"], "eval_reward": m["eval/reward/total"], "eval_response_length": m["eval/response_length"]}


# --------------------------------------------------------------------------- the variants (each in its own process)


def run_ours(args, cfg, train_prompts, eval_prompts) -> dict:
    import torch
    from transformers import set_seed

    from align.modeling import models
    from align.core.memory import peak_memory_mb, reset_peak_memory
    from align.modeling.train_setup import optimizer_and_schedule
    from align.rlhf import group as G
    from align.rlhf.estimators import GroupRelative

    set_seed(args.seed)
    base = models.resolve(cfg.model.name_or_path)
    tokenizer = models.load_tokenizer(base, cfg.model)
    gp = G.GroupPolicy(cfg, base, tokenizer, reward_runs={}, answers={})
    optimizer, scheduler = optimizer_and_schedule(cfg, gp.trainable_parameters(), gp.model, G.optimizer_updates(cfg))
    steps = []
    reset_peak_memory()
    for i in range(args.warmup + args.steps):
        sync(torch)
        start = time.perf_counter()
        m = G.group_step(gp, cfg, train_prompts[i * args.prompts : (i + 1) * args.prompts], optimizer, scheduler, GroupRelative(), step=i)
        sync(torch)
        steps.append({"s": time.perf_counter() - start, "tokens": m["grpo/rollout_tokens"], "response_length": m["grpo/response_length"],
                      "generation_s": m["time/generation_s"], "kl_per_response": m.get("grpo/kl"), "reward": m["grpo/reward/total"]})
        print(f"  ours step {i + 1}: {steps[-1]['s']:.1f} s (sampling {m['time/generation_s']:.1f} s), "
              f"response length {m['grpo/response_length']:.1f}, reward {m['grpo/reward/total']:.3f}", flush=True)
    out = {"peak_memory_mb": peak_memory_mb(), "steps": steps,
           "gradient_checkpointing": bool(getattr(gp.model.get_base_model(), "is_gradient_checkpointing", False))}
    out.update(held_out(gp.model, tokenizer, gp.rewards, cfg, eval_prompts, args.seed))
    return out


def run_trl(args, cfg, train_prompts, eval_prompts, device: str, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.modeling import models
    from align.core.memory import peak_memory_mb, reset_peak_memory

    base = models.resolve(cfg.model.name_or_path)
    tokenizer = models.load_tokenizer(base, cfg.model)
    model = models.load_model(base, cfg.model, device)
    rewards = rewards_object(tokenizer)
    seen = {"rewards": [], "advantages": []}

    def reward(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        total = rewards.score(prompts, texts).total.tolist()
        seen["rewards"].append(total)
        return total

    reward.__name__ = "align_rewards"
    targs = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.prompts * args.group // args.micro, num_generations=args.group,
        max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=args.beta, loss_type="grpo",
        scale_rewards="group", epsilon=0.2, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, max_steps=args.warmup + args.steps, logging_steps=1, report_to=[],
        save_strategy="no", shuffle_dataset=False, seed=args.seed, use_cpu=not device.startswith("cuda"),
        bf16=device.startswith("cuda"), disable_tqdm=True,
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["target_modules"],
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=targs, train_dataset=Dataset.from_dict({"prompt": train_prompts}),
                          processing_class=tokenizer, peft_config=lora)
    generate_and_score = trainer._generate_and_score_completions

    def spied(batch):  # records the advantages TRL computed, in the order of the rewards above (before its shuffle)
        output = generate_and_score(batch)
        seen["advantages"].append(output["advantages"].float().cpu().tolist())
        return output

    trainer._generate_and_score_completions = spied
    steps = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync(torch)
            self.start, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            sync(torch)
            steps.append({"s": time.perf_counter() - self.start, "tokens": state.num_input_tokens_seen - self.tokens})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and steps:
                steps[-1].update(response_length=logs["completions/mean_length"], kl_per_token=logs.get("kl"),
                                 reward=logs.get("reward"))
                print(f"  trl step {len(steps)}: {steps[-1]['s']:.1f} s, response length {logs['completions/mean_length']:.1f}, "
                      f"reward {logs.get('reward', float('nan')):.3f}", flush=True)

    trainer.add_callback(Timer())
    reset_peak_memory()
    trainer.train()
    out = {"peak_memory_mb": peak_memory_mb(), "steps": steps, "gradient_checkpointing": bool(targs.gradient_checkpointing),
           "rewards": seen["rewards"], "advantages": seen["advantages"]}
    out.update(held_out(trainer.model, tokenizer, rewards, cfg, eval_prompts, args.seed))
    return out


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(args) -> int:
    device = device_name()
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-online-{args.child}-"))
    cfg = stage_config(args, args.model, workdir / "unused", kl_bias_correction=args.child != "ours-k3-gradient")
    train_prompts, eval_prompts = prompts_for(args, args.warmup + args.steps)
    if args.child.startswith("ours"):
        result = run_ours(args, cfg, train_prompts, eval_prompts)
    else:
        result = run_trl(args, cfg, train_prompts, eval_prompts, device, workdir)
    args.result.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- the parent: run both, compare


def summarize(name: str, args, raw: dict) -> dict:
    timed = raw["steps"][args.warmup :]
    if len(timed) < 1:
        return {"variant": name, "error": f"only {len(raw['steps'])} steps recorded"}
    step_s = statistics.median(s["s"] for s in timed)
    responses = args.prompts * args.group
    return {
        "variant": name, "median_step_s": step_s, "responses_per_s": responses / step_s,
        "tokens_per_s": statistics.mean(s["tokens"] / s["s"] for s in timed), "peak_memory_mb": raw["peak_memory_mb"],
        "response_length": statistics.mean(s.get("response_length", 0.0) for s in timed),
        "gradient_checkpointing": raw["gradient_checkpointing"], "step_s": [s["s"] for s in raw["steps"]],
        **{k: raw[k] for k in ("eval_kl", "eval_reward", "eval_response_length") if k in raw},
    }


def check_advantages(args, raw_trl: dict, cfg) -> tuple[bool, str]:
    """TRL's rewards through our advantage code must give TRL's advantages, every step."""
    import torch

    from align.rlhf.estimators import GroupRelative

    worst, n = 0.0, 0
    for rewards, theirs in zip(raw_trl["rewards"], raw_trl["advantages"]):
        ours = GroupRelative()(torch.tensor(rewards, dtype=torch.float32), cfg.grpo.group_size, cfg.grpo.scale_advantages)
        worst = max(worst, (ours - torch.tensor(theirs)).abs().max().item())
        n += len(rewards)
    ok = n > 0 and worst <= ADVANTAGE_TOLERANCE
    return ok, (f"correctness: TRL's rewards ({n} responses, {len(raw_trl['rewards'])} steps) through our group advantages: "
                f"max abs diff from TRL's advantages {worst:.1e} ({'PASS' if ok else 'FAIL'}, tolerance {ADVANTAGE_TOLERANCE:g})")


def print_table(results) -> list[str]:
    lines = ["| variant | median s/step | responses/s | tokens/s | peak memory (MB) | response length | grad ckpt | "
             "held-out KL (nats/response) | held-out reward |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} |")
            continue
        kl = f"{r['eval_kl']:.2f}" if "eval_kl" in r else "-"
        reward = f"{r['eval_reward']:.3f}" if "eval_reward" in r else "-"
        lines.append(f"| {r['variant']} | {r['median_step_s']:.2f} | {r['responses_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['response_length']:.1f} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{kl} | {reward} |")
    by = {r["variant"]: r for r in results if "error" not in r}
    if "ours" in by and "trl" in by:
        o, t = by["ours"], by["trl"]
        lines.append(f"ours / trl: {o['responses_per_s'] / t['responses_per_s']:.2f}x responses/s, "
                     f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, peak memory {o['peak_memory_mb'] / t['peak_memory_mb']:.2f}x")
    return lines


def settings_line(args, device: str) -> str:
    return (f"task: {args.shape}, {args.prompts} prompts x {args.group} responses x <= {args.max_tokens} new tokens per step, "
            f"micro-batch {args.micro} ({args.prompts * args.group // args.micro} accumulated: one update per step), "
            f"LoRA r {LORA['r']} alpha {LORA['alpha']} all-linear, lr {args.lr:g} constant, beta {args.beta:g} (k3, in the loss), "
            f"loss grpo / sequence_mean, {args.warmup} warm-up + {args.steps} timed steps, device {device}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    device = device_name()
    print(settings_line(args, device))
    print(f"rewards: {json.dumps(REWARDS)}; variants in order: {', '.join(args.order)}")
    if args.dry_run:
        stage_config(args, "smollm2-135m-instruct", Path(tempfile.gettempdir()) / "bench-online-unused")  # the config is valid
        return 0
    import peft
    import torch
    import transformers
    import trl

    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}; "
          f"{torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU, %d threads' % torch.get_num_threads()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-online-"))
    model = prepare_model(args, device, workdir)
    raw, results = {}, []
    for name in args.order:
        print(f"\n--- {name} ---", flush=True)
        result_file = workdir / f"{name}.json"
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--dry-run"]
        done = subprocess.run([sys.executable, __file__, *forwarded, "--child", name, "--model", model, "--result", str(result_file)])
        if done.returncode != 0 or not result_file.is_file():
            results.append({"variant": name, "error": f"exit status {done.returncode}"})
            continue
        raw[name] = json.loads(result_file.read_text())
        results.append(summarize(name, args, raw[name]))
    print()
    lines = print_table(results)
    ok = True
    if "trl" in raw:
        ok, line = check_advantages(args, raw["trl"], stage_config(args, model, workdir / "unused"))
        lines.append(line)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"settings": settings_line(args, device), "shape": args.shape, "results": results,
                                         "correctness_ok": ok, "table": lines}, indent=1))
    return 0 if ok and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

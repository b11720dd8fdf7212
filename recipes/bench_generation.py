#!/usr/bin/env python
"""Generation speed, side by side in one process: plain `model.generate` vs align's shared path.

    python recipes/bench_generation.py                         # 16 prompts x 4 samples x 40 tokens, embedded model
    python recipes/bench_generation.py --prompts 60 --samples 8 --max-new-tokens 40 --batch-size 8

Both variants get the same model (as align loads it: fp32 + eager attention on the CPU, bf16 +
sdpa on CUDA, unless --attn), the same held-out demo prompts rendered with the chat template,
the same sampling (temperature, top-p, no top-k, stop at the end-of-turn token), the same
number of prompts per batch, and the same seed:

  plain   transformers' `model.generate(num_return_sequences=k)` on each left-padded batch:
          what `align-data generate` and the online stages ran before;
  shared  `align.modeling.generation.generate` (prefill once per prompt, the KV cache repeated
          for the k samples, finished rows leave the batch, batches grouped by prompt length).

The variants alternate (plain, shared, plain, shared, ...) for --rounds rounds after a warm-up,
so drift in a shared machine's load hits both; medians are reported. Printed per variant: wall
time, generated tokens (up to and including the end-of-turn token), tokens/s (medians over the
rounds); the ratios; and how
much CPU the process got (CPU time / wall time / threads: 1.0 = all its threads ran all the
time; lower means other jobs shared the cores) with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import torch  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model alias, folder or hub id")
    p.add_argument("--prompts", type=int, default=16, help="distinct held-out demo prompts")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt (num_return_sequences)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: all in one)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--attn", default="auto", choices=["auto", "eager", "sdpa"])
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each variant, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the figures as JSON here")
    return p.parse_args()


def load(args):
    from align.core.config import ModelConfig
    from align.core.data import distinct_prompts, read_splits
    from align.core.normalize import normalize_prompt
    from align.modeling.models import default_device, load_model, load_tokenizer, resolve

    cfg = ModelConfig(attn_implementation=args.attn)
    ref = resolve(args.model)
    device = default_device()
    model = load_model(ref, cfg, device=device).eval()
    tokenizer = load_tokenizer(ref, cfg)
    rows = [normalize_prompt(row, where) for where, row in read_splits("bundled:demo-prefs")["test"]]
    prompts = distinct_prompts(rows, args.prompts)
    if len(prompts) < args.prompts:
        raise SystemExit(f"--prompts {args.prompts}: the demo test split has only {len(prompts)} distinct prompts")
    return model, tokenizer, prompts, device


def plain(model, tokenizer, prompts, args, batch_size) -> tuple[list[str], int]:
    """transformers' generate, batch by batch in the prompts' order: (texts, generated tokens)."""
    from align.modeling.generation import _encode, _response_lengths, eos_token_ids

    eos = eos_token_ids(model, tokenizer)
    texts, count = [], 0
    for start in range(0, len(prompts), batch_size):
        ids, attn = _encode(tokenizer, prompts[start : start + batch_size], model.device)
        with torch.no_grad():
            seq = model.generate(
                input_ids=ids, attention_mask=attn, max_new_tokens=args.max_new_tokens, do_sample=True,
                temperature=args.temperature, top_p=args.top_p, top_k=0, num_return_sequences=args.samples,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
            )
        new = seq[:, ids.shape[1] :]
        lengths, _ = _response_lengths(new, eos)
        count += int(lengths.sum())
        texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts, count


def shared(model, tokenizer, prompts, args, batch_size) -> tuple[list[str], int]:
    """align.modeling.generation.generate, its generated tokens counted at its decode loop."""
    from align.modeling import generation

    counted = []
    decode = generation.decode

    def counting(*a, **kw):
        tokens = decode(*a, **kw)
        lengths, _ = generation._response_lengths(tokens, a[4] if len(a) > 4 else kw["eos_ids"])
        counted.append(int(lengths.sum()))
        return tokens

    s = generation.Sampling(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                            top_p=args.top_p, num_return_sequences=args.samples)
    generation.decode = counting
    try:
        texts = generation.generate(model, tokenizer, prompts, batch_size=batch_size, sampling=s)
    finally:
        generation.decode = decode
    return texts, sum(counted)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer, prompts, device = load(args)
    batch_size = args.batch_size or len(prompts)
    threads = torch.get_num_threads()
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{next(model.parameters()).dtype}, attention {model.config._attn_implementation}) on {device}, {threads} threads; "
          f"{len(prompts)} prompts x {args.samples} samples x {args.max_new_tokens} new tokens, {batch_size} prompts per batch, "
          f"T={args.temperature}, top-p {args.top_p}", flush=True)

    variants = {"plain": plain, "shared": shared}

    # Warm-up: one short call of each (allocator, kernels, lazy imports).
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
    for fn in variants.values():
        fn(model, tokenizer, prompts[:2], warm, 2)

    load_before = os.getloadavg()
    results: dict[str, list[tuple[float, float, int]]] = {"plain": [], "shared": []}
    for r in range(args.rounds):
        for name, fn in variants.items():
            torch.manual_seed(args.seed + r)
            (_, tokens), wall, cpu = timed(lambda: fn(model, tokenizer, prompts, args, batch_size))
            results[name].append((wall, cpu, tokens))
            print(f"  round {r + 1} {name:<6} {wall:8.2f} s wall, {tokens} tokens, CPU share {cpu / wall / threads:.2f}", flush=True)
    load_after = os.getloadavg()

    rows = {}
    for name, runs in results.items():
        rows[name] = {
            "wall_s": round(statistics.median(w for w, _, _ in runs), 2),
            "tokens": round(statistics.median(n for _, _, n in runs)),
            "tokens_per_s": round(statistics.median(n / w for w, _, n in runs), 1),
            "cpu_share": round(statistics.median(c / w / threads for w, c, _ in runs), 2),
        }
    print("\n| variant | median wall (s) | generated tokens | tokens/s | CPU share |\n| --- | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['wall_s']} | {row['tokens']} | {row['tokens_per_s']} | {row['cpu_share']} |")
    speedup = rows["plain"]["wall_s"] / rows["shared"]["wall_s"]
    per_token = rows["shared"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
    print(f"\nshared / plain: {speedup:.2f}x faster in wall time, {per_token:.2f}x the tokens/s "
          f"(the samples differ after the first row ends, so the token counts differ a little)")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "variants": rows, "speedup": round(speedup, 3),
                                                 "load_before": load_before, "load_after": load_after}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What per-row seeded sampling costs, in one process: the shared decoding loop with and without row seeds.

    python recipes/bench_row_seeds.py                     # 16 prompts x 4 samples x 40 tokens, embedded model

The online stages draw each response with its own seed (align/modeling/generation.py: one generator
per response row, an exponential race over the temperature / top-p scores), so that a rollout split
over N processes equals one process's. `global` draws from the global generator with one multinomial
call per step; `row-seeded` draws Exp(1) noise over the vocabulary for every live row. The variants
alternate for --rounds rounds after a warm-up; medians are reported, with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_generation import load  # noqa: E402  - the same model and prompts as the generation bench


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--attn", default="auto", choices=["auto", "eager", "sdpa"])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from align.modeling.generation import Sampling, sample_tokens

    model, tokenizer, prompts, device = load(args)
    s = Sampling(max_new_tokens=args.max_new_tokens, do_sample=True, top_p=args.top_p, num_return_sequences=args.samples)
    seeds = list(range(len(prompts) * args.samples))
    variants = {"global": lambda: sample_tokens(model, tokenizer, prompts, s),
                "row-seeded": lambda: sample_tokens(model, tokenizer, prompts, s, row_seeds=seeds)}
    print(f"model {args.model} on {device}, {torch.get_num_threads()} threads; {len(prompts)} prompts x {args.samples} samples x "
          f"{args.max_new_tokens} new tokens, top-p {args.top_p}", flush=True)
    for fn in variants.values():  # warm-up
        fn()
    per_token: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            torch.manual_seed(r)
            start = time.perf_counter()
            roll = fn()
            wall = time.perf_counter() - start
            tokens = int(roll.mask.sum())
            per_token[name].append(wall / tokens * 1000)
            print(f"  round {r + 1} {name:<10} {wall:7.2f} s, {tokens} tokens, {wall / tokens * 1000:.2f} ms/token", flush=True)
    medians = {name: statistics.median(v) for name, v in per_token.items()}
    print(f"\nmedian ms per generated token: global {medians['global']:.2f}, row-seeded {medians['row-seeded']:.2f}; "
          f"row-seeded / global = {medians['row-seeded'] / medians['global']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

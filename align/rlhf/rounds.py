"""Online DPO's rounds: sample and score a round, pair it, keep it on disk.

A round: K samples per prompt from the current policy (round 1: the fresh adapter, i.e. the SFT
model; round n: the adapter as round n-1 left it), each scored by the reward sources
(align/rlhf/rewards.py), paired per prompt with the shared pairing and structural checks
(align/core/pairing.py, the same code as `align-data generate`), then DPO on those pairs with the
shared DPO trainer (align/preference/dpo_setup.py). The stage (align/stages/online_dpo.py) runs the rounds.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from align.core.files import atomic_write_text
from align.core.pairing import Candidate, Group, pair_group, structural_problem

ROUNDS = "rounds"  # RunDir folder: rounds/round-<n>/{samples,pairs}.jsonl


@dataclass
class RoundSamples:
    prompts: list[list[dict]]
    responses: list[str]  # k per prompt, prompt by prompt
    scores: object  # align.rlhf.rewards.Scores
    k: int


def sampling_for(opts, seed: int | None = None):
    from align.modeling.generation import Sampling

    return Sampling(max_new_tokens=opts.max_new_tokens, do_sample=True, temperature=opts.temperature, top_p=opts.top_p,
                    num_return_sequences=opts.num_samples, seed=seed)


def sample_round(engine, rewards, prompts: list[list[dict]], opts, seed: int, round_no: int) -> RoundSamples:
    """K samples per prompt from the policy (through the rollout `engine`), and their scores.

    Sample j of the round's prompt i is drawn with the seed (seed, round, i, j). With several
    processes each samples and scores its share of the prompts (in batches of
    online.generation_batch_size prompts) and every rank gathers the whole round, so the round, and
    the pairs made of it, do not depend on the number of processes.
    """
    import torch

    from align.rlhf.distributed import row_seed, world
    from align.rlhf.rewards import Scores

    ranks, k = world(), opts.num_samples
    mine = list(ranks.share(len(prompts)))
    sampling = sampling_for(opts, None)
    responses: list[str] = []
    for start in range(0, len(mine), opts.generation_batch_size):
        batch = mine[start : start + opts.generation_batch_size]
        seeds = [row_seed(seed, round_no, i, j) for i in batch for j in range(k)]
        responses += engine.sample([prompts[i] for i in batch], sampling, seeds).responses
    scores = rewards.score([prompts[i] for i in mine for _ in range(k)], responses)
    parts = ranks.gather({"responses": responses, "per_source": scores.per_source, "total": scores.total})
    joined = Scores(scores.names, torch.cat([p["per_source"] for p in parts]), torch.cat([p["total"] for p in parts]))
    return RoundSamples(prompts, [r for p in parts for r in p["responses"]], joined, k)


def pairs_of(samples: RoundSamples, strategy: str, min_margin: float, round_no: int) -> tuple[list[dict], Counter]:
    """Preference rows from the scored samples, and what was not paired or was dropped (counted by reason)."""
    counts: Counter = Counter()
    rows: list[dict] = []
    total = samples.scores.total.tolist()
    for i, prompt in enumerate(samples.prompts):
        candidates = []
        for j in range(samples.k):
            score = total[i * samples.k + j]
            if math.isnan(score):
                counts["unscored_responses"] += 1
                continue
            text = samples.responses[i * samples.k + j]
            candidates.append(Candidate([{"role": "assistant", "content": text}], score, f"s{j}", f"round {round_no}"))
        group = Group(prompt, candidates, id=f"r{round_no}p{i}", where=f"round {round_no}, prompt {i}")
        for pair in pair_group(group, strategy, min_margin, counts):
            problem = structural_problem(pair)
            if problem:
                counts[problem] += 1
                continue
            rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                         "score_chosen": pair.score_chosen, "score_rejected": pair.score_rejected, "id": pair.id})
    return rows, counts


def write_round(run_path: Path, round_no: int, samples: RoundSamples, pairs: list[dict]) -> Path:
    """rounds/round-<n>/samples.jsonl (every sample with each source's score and the total) and pairs.jsonl."""
    folder = Path(run_path) / ROUNDS / f"round-{round_no}"
    folder.mkdir(parents=True, exist_ok=True)
    per_source = samples.scores.per_source.tolist()
    total = samples.scores.total.tolist()
    lines = []
    for i, prompt in enumerate(samples.prompts):
        rows = range(i * samples.k, (i + 1) * samples.k)
        lines.append(json.dumps({
            "prompt": prompt,
            "responses": [samples.responses[r] for r in rows],
            "scores": [None if math.isnan(total[r]) else total[r] for r in rows],
            "sources": {name: [None if math.isnan(per_source[r][j]) else per_source[r][j] for r in rows]
                        for j, name in enumerate(samples.scores.names)},
        }, ensure_ascii=False))
    atomic_write_text(folder / "samples.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(folder / "pairs.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return folder


def read_round_samples(run_path: Path, round_no: int) -> list[dict]:
    path = Path(run_path) / ROUNDS / f"round-{round_no}" / "samples.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@contextlib.contextmanager
def restored_forward(model):
    """TRL's trainer (and the DPO fast path) patch the causal LM's forward for their own use; undo
    that after a round, so the next round's trainer patches the original forward, not a stack of them."""
    saved = model.__dict__.get("forward")
    try:
        yield
    finally:
        if saved is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = saved


def stop_on_signal(interrupt):
    """A TrainerCallback that ends training after the current step once `interrupt` caught a signal
    (without the HF checkpoint InterruptCallback asks for: a round is checkpointed whole or not at all);
    with several processes all stop at the same step, whichever the signal reached first."""
    from transformers import TrainerCallback

    from align.rlhf.distributed import world

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if world().any(bool(interrupt.signal_name)):
                interrupt.signal_name = interrupt.signal_name or "SIGTERM"
                control.should_training_stop = True
            return control

    return StopOnSignal()

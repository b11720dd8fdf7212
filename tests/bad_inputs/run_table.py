#!/usr/bin/env python
"""Replay bad inputs through align's real command lines and tabulate what each gave.

    python tests/bad_inputs/run_table.py [--output table.md] [--work DIR] [--only REGEX] [-j N]

Builds a small workspace first (a tiny random-init Llama with the embedded model's tokenizer,
tiny data, a finished SFT run, a reward run, a PPO run with a tampered checkpoint, a run dir that
asks for remote code, someone else's folder), then runs each case as a subprocess: recipes,
`python -m align` and `python -m data_tools`, each in its own process as a user would. A case
passes ("ok") when the exit status is the expected one, the expected words appear (in the single
`error:` line for a refusal), no traceback is printed, and its own check holds (a folder left
byte-identical, no marker of remote code, no secret under the run dir). The table goes to stdout
or --output. Takes about 10-15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

EVIL = '''\
import os
from pathlib import Path
Path(os.environ.get("ALIGN_TEST_MARKER") or {default!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


# --------------------------------------------------------------------------- the workspace


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def msgs(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def pref(i: int) -> dict:
    return {"prompt": msgs("user", f"What is {i} plus one? Reply with only the answer."),
            "chosen": msgs("assistant", f"{i + 1}"),
            "rejected": msgs("assistant", f"Adding one to {i} gives {i + 1}, as you can check.")}


def write_yaml(path: Path, data: dict, command: str) -> Path:
    import yaml

    path.write_text(f"# {command}\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_train() -> dict:
    return {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0, "logging_steps": 1, "max_length": 64}


def build_workspace(w: Path) -> dict[str, str]:
    """Everything the cases refer to; returns the placeholders of their commands."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from align.core.artifacts import RunDir
    from align.core.config_loader import load_config, to_dict
    from align.modeling.models import embedded_model_dir
    from align.stages.registry import run_stage
    from align.stages.ppo import PPOConfig
    from align.stages.reward import RewardConfig
    from align.stages.sft import SFTConfig

    w.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m-instruct"))
    tiny = w / "tiny"
    if not (tiny / "config.json").is_file():
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tiny)
        tok.save_pretrained(tiny)

    d = w / "data"
    d.mkdir(exist_ok=True)
    sft_rows = [{"messages": msgs("user", f"What is {i} plus one?") + msgs("assistant", f"{i} plus one is {i + 1}.")} for i in range(24)]
    jsonl(d / "sft.jsonl", sft_rows)
    jsonl(d / "prefs.jsonl", [pref(i) for i in range(24)])
    bad = [
        {**pref(100), "chosen": msgs("assistant", "")},
        {**pref(101), "chosen": msgs("assistant", "same"), "rejected": msgs("assistant", "same")},
        {**pref(102), "prompt": msgs("assistant", "hi") + msgs("user", "q?")},
        {**pref(103), "score_chosen": 0.0, "score_rejected": 2.0},
        pref(0),
    ]
    jsonl(d / "prefs_with_bad_rows.jsonl", [pref(i) for i in range(24)] + bad)
    jsonl(d / "prefs_all_bad.jsonl", bad[:4])
    (d / "bad_json.jsonl").write_text(json.dumps(sft_rows[0]) + "\n{\"messages\": [\n")
    (d / "bad_utf8.jsonl").write_bytes(json.dumps(sft_rows[0]).encode() + b"\n{\"messages\": \"\xff\xfe\"}\n")
    jsonl(d / "lacking.jsonl", sft_rows[:2] + [{"text": "no messages"}])
    jsonl(d / "prefs_missing_chosen.jsonl", [{"prompt": "q", "rejected": "r"}])
    (d / "bad_pairs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n{\"prompt\": \n")
    (d / "data.txt").write_text("plain text\n")
    (d / "empty.jsonl").write_text("")
    jsonl(d / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)])

    c = w / "configs"
    c.mkdir(exist_ok=True)
    runs = w / "runs"
    common = {"samples": {"num_prompts": 2, "max_new_tokens": 4}, "tracking": "none"}
    sft_cfg = {"output_dir": str(w / "out" / "sft"), "model": {"name_or_path": str(tiny)},
               "data": {"path": str(d / "sft.jsonl"), "eval_split": None, "eval_fraction": 0.25}, "train": tiny_train(), **common}
    write_yaml(c / "sft.yaml", sft_cfg, "python recipes/sft.py --config sft.yaml")
    child = {"parent_run": str(runs / "sft"), "data": {"path": str(d / "prefs.jsonl"), "eval_split": None, "eval_fraction": 0.25},
             "train": tiny_train(), **common}
    write_yaml(c / "dpo.yaml", {"output_dir": str(w / "out" / "dpo"), **child}, "python recipes/dpo.py --config dpo.yaml")
    write_yaml(c / "reward.yaml", {"output_dir": str(w / "out" / "reward"), **child, "reward": {"stats_samples": 8}},
               "python recipes/reward.py --config reward.yaml")
    ppo_cfg = {"output_dir": str(w / "out" / "ppo"), **child, "reward_run": str(runs / "reward"),
               "ppo": {"rollout_batch_size": 4, "minibatch_size": 2, "max_new_tokens": 4}}
    write_yaml(c / "ppo.yaml", ppo_cfg, "python recipes/ppo.py --config ppo.yaml")
    write_yaml(c / "eval.yaml", {"output_dir": str(w / "out" / "eval" / "eval"), "runs": {"sft": str(runs / "sft")},
                                 "data": {"path": str(d / "prefs.jsonl"), "eval_split": None, "eval_fraction": 0.25},
                                 "perplexity_data": None, "num_prompts": 4, "num_pairs": 4, "bootstrap": 10,
                                 "sampling": {"max_new_tokens": 4}, "tracking": "none"}, "python recipes/eval.py --config eval.yaml")
    write_yaml(c / "pipeline.yaml", {"name": "bad-inputs", "output_dir": str(w / "out" / "pipeline"), "tracking": "none",
                                     "stages": [{"name": "sft", "stage": "sft", "config": "sft.yaml"},
                                                {"name": "dpo", "stage": "dpo", "config": "dpo.yaml", "parent": "sft"}]},
               "python recipes/pipeline.py --config pipeline.yaml")

    # Finished runs (in this process: torch is loaded once).
    if not RunDir(runs / "sft").is_finished():
        run_stage(load_config(SFTConfig, c / "sft.yaml", {"output_dir": str(runs / "sft")}))
    if not RunDir(runs / "reward").is_finished():
        run_stage(load_config(RewardConfig, c / "reward.yaml", {"output_dir": str(runs / "reward"), "train.max_steps": 3}))
    tampered = runs / "ppo-tampered"
    if not (tampered / "checkpoints" / "checkpoint-1").is_dir():
        ppo_run_cfg = load_config(PPOConfig, c / "ppo.yaml", {"output_dir": str(tampered), "train.save_steps": 1})
        run_stage(ppo_run_cfg)
        RunDir(tampered).update(status="interrupted")
        write_yaml(c / "ppo_tampered.yaml", to_dict(ppo_run_cfg), "python recipes/ppo.py --config ppo_tampered.yaml --resume")
    marker_pickle = w / "PICKLE_RAN"
    torch.save({"optimizer": LeavesAMarker(str(marker_pickle)), "scheduler": {}},
               tampered / "checkpoints" / "checkpoint-2" / "optimizer.pt")

    # A run dir that asks for remote code.
    rc = w / "remote"
    if not (rc / "run" / "adapter").is_dir():
        base = rc / "base"
        shutil.copytree(tiny, base)
        (base / "evil.py").write_text(EVIL.format(default=str(w / "REMOTE_CODE_RAN")))
        conf = json.loads((base / "config.json").read_text())
        conf["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        (base / "config.json").write_text(json.dumps(conf))
        torch.manual_seed(0)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        staging = rc / "staging"
        peft_model.save_pretrained(staging)
        ac = json.loads((staging / "adapter_config.json").read_text())
        ac["base_model_name_or_path"] = str(base)
        (staging / "adapter_config.json").write_text(json.dumps(ac))
        shutil.copy(base / "evil.py", staging / "evil.py")
        run_config = {"model": {"name_or_path": str(base), "trust_remote_code": True}}
        run = RunDir.start(rc / "run", stage="sft", config=run_config, config_yaml=yaml.safe_dump(run_config), run_key="k", parent=None,
                           base_model={"name": str(base), "location": str(base), "content_hash": "sha256:x"}, dataset={})
        shutil.copytree(staging, run.adapter_dir)
        run.finish(summary={}, outputs={"adapter": "adapter"})

    # Adapter folders with broken configs.
    for name, text in (("broken_json", '{"peft_type": "LORA",,}'), ("list_json", "[1, 2]"), ("no_type", '{"r": 8}')):
        folder = w / "adapters" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(text)

    # A model whose chat template raises (a library error mid-run).
    raising = w / "raising-model"
    if not raising.is_dir():
        shutil.copytree(tiny, raising)
        tc = json.loads((raising / "tokenizer_config.json").read_text())
        tc["chat_template"] = "{{ raise_exception('this template refuses every conversation') }}"
        (raising / "tokenizer_config.json").write_text(json.dumps(tc))
        (raising / "chat_template.jinja").unlink(missing_ok=True)
    (w / "not-a-model").mkdir(exist_ok=True)
    (w / "not-a-model" / "weights.bin").write_text("x")

    return {
        "w": str(w), "repo": str(REPO), "tiny": str(tiny), "data": str(d), "cfg": str(c), "runs": str(runs),
        "sft": str(c / "sft.yaml"), "dpo": str(c / "dpo.yaml"), "reward": str(c / "reward.yaml"), "ppo": str(c / "ppo.yaml"),
        "eval": str(c / "eval.yaml"), "pipeline": str(c / "pipeline.yaml"), "ppo_tampered": str(c / "ppo_tampered.yaml"),
        "compare": str(REPO / "recipes" / "configs" / "smollm2-135m" / "compare_methods.yaml"),
        "remote_run": str(rc / "run"), "raising": str(raising), "marker": str(w / "REMOTE_CODE_RAN"),
        "pickle_marker": str(marker_pickle),
        **build_issue22_workspace(w, c, d, runs),
    }


class LeavesAMarker:
    """What a tampered checkpoint holds: a pickle that writes a file when loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickled code ran"))


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str  # the bad input
    command: str  # with {placeholders}; "recipes/x.py", "-m align", "-m data_tools" run with this python
    rc: int  # expected exit status
    expect: str  # regex that must appear (in the error line for a refusal, else in the output)
    setup: Callable[[dict], None] | None = None
    check: Callable[[dict, subprocess.CompletedProcess], str | None] | None = None  # returns a problem or None
    env: dict = field(default_factory=dict)
    traceback_ok: bool = False


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def foreign_folder(p: dict, name: str, build_json: bool = False) -> Path:
    folder = Path(p["w"]) / "foreign" / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/"}))
    (folder / "src" / "app.js").write_text("console.log(1)\n")
    (folder / "README.md").write_text("# mine\n")
    if build_json:
        (folder / "build.json").write_text(json.dumps({"target": "web"}))
    p[f"snap:{name}"] = snapshot(folder)
    return folder


def unchanged(name: str):
    def check(p: dict, proc) -> str | None:
        folder = Path(p["w"]) / "foreign" / name
        return None if snapshot(folder) == p[f"snap:{name}"] else f"{folder} was changed"
    return check


def no_marker(key: str = "marker"):
    def check(p: dict, proc) -> str | None:
        return f"{p[key]} exists: code ran" if Path(p[key]).exists() else None
    return check


def lock_with(pid: int | None, host: str | None = None):
    def setup(p: dict) -> None:
        run = Path(p["w"]) / "out" / "locked"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        holder_pid = pid
        if holder_pid is None:  # a live holder: a sleeping process of ours
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            p.setdefault("_children", []).append(proc)
            holder_pid = proc.pid
        elif holder_pid == -1:  # a dead one
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            holder_pid = dead.pid
        (run / ".align-lock").write_text(json.dumps({"pid": holder_pid, "host": host or socket.gethostname(),
                                                     "started_at": "earlier", "command": "recipes/sft.py"}))
        p["holder_pid"] = holder_pid
    return setup


def no_secret(p: dict, proc) -> str | None:
    run = Path(p["w"]) / "out" / "secret"
    secrets = [b"hf_TypedOnTheCommandLine0987654321zy", b"hf_EnvironmentSecret1234567890abcd", b"correct-horse-battery-staple"]
    leaks = [str(f.relative_to(run)) for f in run.rglob("*") if f.is_file() and any(s in f.read_bytes() for s in secrets)]
    if not list((run / "wandb").rglob("*.wandb")):
        return "no W&B files to check"
    return f"secrets in {leaks}" if leaks else None


def manifest_status(path_key: str, rel: str, status: str):
    def check(p: dict, proc) -> str | None:
        m = json.loads((Path(p[path_key]) / rel / "manifest.json").read_text())
        return None if m.get("status") == status else f"status {m.get('status')}, expected {status}"
    return check


def dpo_counted(p: dict, proc) -> str | None:
    m = json.loads((Path(p["w"]) / "out" / "dpo-bad-rows" / "manifest.json").read_text())
    dropped = m["dataset"].get("dropped", {}).get("train", {})
    return None if sum(dropped.values()) == 5 else f"dropped {dropped}"


def cases() -> list[Case]:
    R = "recipes/{}.py --config {{{}}}"
    sft, dpo, rew, ppo, ev, pipe = (R.format(s, s) for s in ("sft", "dpo", "reward", "ppo", "eval", "pipeline"))
    ppo = "recipes/ppo.py --config {ppo}"
    rew = "recipes/reward.py --config {reward}"
    ev = "recipes/eval.py --config {eval}"
    out = "output_dir={w}/out/never"
    rng = r"command line: {}: must"

    def value(stage_cmd: str, key: str, val: str, why: str | None = None) -> Case:
        quoted = shlex.quote(val).replace("{", "{{").replace("}", "}}")
        return Case(f"`{key}: {val}`" + (f" ({why})" if why else ""), f"{stage_cmd} {out} {key}={quoted}", 2,
                    rng.format(re.escape(key)))

    c = [
        # ----- values out of range (the issue's known gaps first)
        value(sft, "train.warmup_ratio", "-1"), value(sft, "train.warmup_ratio", "5"),
        value(sft, "train.warmup_ratio", "1", "a ratio of 1 would reach TRL as 1 step"),
        value(sft, "train.epochs", "0"), value(sft, "train.epochs", "-2"), value(sft, "train.max_grad_norm", "-1"),
        value(sft, "train.max_grad_norm", "0"), value(sft, "lora.alpha", "0"), value(sft, "lora.r", "0"),
        value(sft, "lora.dropout", "1"), value(sft, "lora.dropout", "-0.1"), value(sft, "samples.max_new_tokens", "0"),
        value(sft, "train.eval_steps", "0"), value(sft, "data.max_train_samples", "-5", "trained on 691 of 696 rows before"),
        value(sft, "data.max_train_samples", "0", "was blamed on max_length"), value(sft, "data.max_eval_samples", "0"),
        value(sft, "lora.target_modules", "[]"), value(sft, "lora.target_modules", '""'),
        value(sft, "train.eval_batch_size", "0", "was silently replaced by batch_size"), value(sft, "train.batch_size", "0"),
        value(sft, "train.batch_size", "-1"), value(sft, "train.gradient_accumulation_steps", "0"),
        value(sft, "train.learning_rate", "0"), value(sft, "train.learning_rate", "-1e-4"), value(sft, "train.max_steps", "0"),
        value(sft, "train.max_length", "0"), value(sft, "train.max_length", "1"), value(sft, "train.seed", "-1"),
        value(sft, "train.seed", "4294967296"), value(sft, "train.logging_steps", "0"), value(sft, "train.save_steps", "0"),
        value(sft, "train.save_total_limit", "1"), value(sft, "train.weight_decay", "-0.1"), value(sft, "train.weight_decay", "2"),
        value(sft, "data.eval_fraction", "1"), value(sft, "data.eval_fraction", "-0.1"), value(sft, "samples.num_prompts", "-1"),
        value(sft, "sft.label_smoothing", "1"), value(sft, "sft.neftune_noise_alpha", "0"), value(sft, "peft.vera.r", "0"),
        value(sft, "peft.vera.d_initial", "0"), value(sft, "peft.ia3.target_modules", "[]"),
        value(sft, "peft.prompt_tuning.num_virtual_tokens", "0"), value(sft, "peft.prefix_tuning.num_virtual_tokens", "-3"),
        value(dpo, "dpo.beta", "0"), value(dpo, "dpo.beta", "-0.1"), value(dpo, "dpo.label_smoothing", "0.5"),
        value(rew, "reward.stats_samples", "1"), value(rew, "reward.center_rewards_coefficient", "-1"),
        value(ppo, "ppo.rollout_batch_size", "0"), value(ppo, "ppo.top_p", "0"), value(ppo, "ppo.top_p", "1.5"),
        value(ppo, "ppo.temperature", "0"), value(ppo, "ppo.gamma", "1.5"), value(ppo, "ppo.lam", "-0.1"),
        value(ppo, "ppo.kl_coef", "-1"), value(ppo, "ppo.target_kl", "0"), value(ppo, "ppo.clip_range", "0"),
        value(ppo, "ppo.vf_coef", "0"), value(ppo, "ppo.kl_horizon", "0"), value(ppo, "ppo.value_head_init_std", "-1"),
        value(ev, "num_prompts", "0"), value(ev, "bootstrap", "0"), value(ev, "sampling.temperature", "0"),
        value(ev, "sampling.top_p", "2"), value(ev, "judges", "[]"), value(ev, "runs", "{}"),
        Case("`stages: []` (pipeline)", "recipes/pipeline.py --config {pipeline} stages=[]", 2, r"command line: stages: must not be empty"),
        Case("`methods: []` (comparison)", "recipes/compare_methods.py --config {compare} output_dir={w}/out/cmp methods=[]", 2,
             r"command line: methods: must not be empty"),
        # ----- combinations of keys
        Case("`ppo.minibatch_size` that does not divide the rollout", f"{ppo} {out} ppo.minibatch_size=3", 2,
             r"command line: ppo.minibatch_size: must divide"),
        Case("PPO without `train.max_steps`", f"{ppo} {out} train.max_steps=null", 2, r"command line: train.max_steps: required for PPO"),
        Case("`peft.ia3.feedforward_modules` not among the targets", f"{sft} {out} peft.method=ia3 peft.ia3.feedforward_modules=[o_proj]", 2,
             r"peft.ia3.feedforward_modules: \['o_proj'\] not in"),
        Case("`parent_run` and `model.name_or_path` both set", f"recipes/dpo.py --config {{dpo}} {out} model.name_or_path={{tiny}}", 2,
             r"parent_run / model.name_or_path: set exactly one"),
        Case("eval `baseline` not among `runs`", f"{ev} {out} baseline=nope", 2, r"command line: baseline: 'nope' is not one of runs"),
        Case("unknown judge", f"{ev} {out} judges=[nosuchjudge]", 2, r"judges.*unknown judge 'nosuchjudge'"),
        Case("`methods: [lora, lora]` (comparison)", "recipes/compare_methods.py --config {compare} output_dir={w}/out/cmp methods=[lora,lora]",
             2, r"methods: a method is listed twice"),
        # ----- keys and types
        Case("misspelled key on the command line", f"{sft} train.max_step=3", 2, r"command line: unknown key 'train.max_step' \(did you mean 'train.max_steps'\?\)"),
        Case("key in the wrong section", f"{sft} learning_rate=0.1", 2, r"did you mean 'train.learning_rate'"),
        Case("wrong type: `train.batch_size: big`", f"{sft} train.batch_size=big", 2, r"train.batch_size: expected an integer, got 'big'"),
        Case("a boolean for an integer", f"{sft} train.batch_size=true", 2, r"train.batch_size: expected an integer, got True"),
        Case("a choice misspelled: `peft.method: lorra`", f"{sft} peft.method=lorra", 2, r"peft.method: expected one of .*did you mean 'lora'"),
        Case("`model.dtype: fp32`", f"{sft} model.dtype=fp32", 2, r"model.dtype: expected one of"),
        Case("NaN learning rate", f"{sft} train.learning_rate=.nan", 2, r"train.learning_rate: expected a finite number"),
        Case("infinite beta", "recipes/dpo.py --config {dpo} dpo.beta=.inf", 2, r"dpo.beta: expected a finite number"),
        Case("override without `=`", f"{sft} train.max_steps", 2, r"an override is key=value"),
        Case("override into a value as if it were a section", f"{sft} output_dir.x=1", 2, r"output_dir.x: 'output_dir' is not a section"),
        Case("unknown stage in a pipeline", "recipes/pipeline.py --config {pipeline} 'stages=[{{name: a, stage: sfft, config: sft.yaml}}]'",
             2, r"unknown stage 'sfft' \(did you mean 'sft'\?\)"),
        # ----- YAML files
        Case("duplicate top-level key (first section silently dropped before)", "recipes/sft.py --config {w}/yaml/dup_top.yaml", 2,
             r"dup_top.yaml:\d+: duplicate key 'train' \(first at line \d+\)", setup=lambda p: yaml_file(p, "dup_top.yaml", "dup_top")),
        Case("duplicate nested key", "recipes/sft.py --config {w}/yaml/dup_nested.yaml", 2, r"duplicate key 'train.max_steps'",
             setup=lambda p: yaml_file(p, "dup_nested.yaml", "dup_nested")),
        Case("self-referencing YAML alias (a RecursionError dump before)", "recipes/sft.py --config {w}/yaml/recursive.yaml", 2,
             r"an alias refers to itself", setup=lambda p: yaml_file(p, "recursive.yaml", "recursive")),
        Case("YAML alias bomb", "recipes/sft.py --config {w}/yaml/bomb.yaml", 2, r"aliases expand to more than",
             setup=lambda p: yaml_file(p, "bomb.yaml", "bomb")),
        Case("invalid YAML", "recipes/sft.py --config {w}/yaml/invalid.yaml", 2, r"invalid.yaml:\d+: invalid YAML",
             setup=lambda p: yaml_file(p, "invalid.yaml", "invalid")),
        Case("a YAML list instead of a mapping", "recipes/sft.py --config {w}/yaml/list.yaml", 2, r"a config is a mapping of keys",
             setup=lambda p: yaml_file(p, "list.yaml", "list")),
        Case("an empty YAML file", "recipes/sft.py --config {w}/yaml/empty.yaml", 2, r"output_dir: required",
             setup=lambda p: yaml_file(p, "empty.yaml", "empty")),
        Case("config file not UTF-8", "recipes/sft.py --config {w}/yaml/latin1.yaml", 2, r"cannot read config",
             setup=lambda p: yaml_file(p, "latin1.yaml", "latin1")),
        Case("config file missing", "recipes/sft.py --config {w}/nope.yaml", 2, r"nope.yaml: config file not found"),
        Case("no --config", "recipes/sft.py", 2, r"--config: required"),
        Case("range error inside the YAML file names its line", "recipes/sft.py --config {w}/yaml/range.yaml", 2,
             r"range.yaml:\d+: train.warmup_ratio: must be in \[0, 1\), got 5", setup=lambda p: yaml_file(p, "range.yaml", "range")),
        # ----- output dirs
        Case("output_dir is a file", f"{sft} output_dir={{w}}/a-file", 2, r"output_dir: .*a-file is a file, not a folder",
             setup=a_file),
        Case("output_dir is someone else's folder with a manifest.json (was emptied before)", f"{sft} output_dir={{w}}/foreign/webapp", 2,
             r"not an align run dir", setup=lambda p: foreign_folder(p, "webapp"), check=unchanged("webapp")),
        Case("output_dir is a non-empty folder without any manifest", f"{sft} output_dir={{w}}/foreign/plain", 2, r"not an align run dir",
             setup=lambda p: foreign_folder(p, "plain"), check=unchanged("plain")),
        Case("output_dir under a file", f"{sft} output_dir={{w}}/a-file/run", 2, r"cannot write .* is a file",
             setup=a_file),
        Case("output_dir in use by a live run", f"{sft} output_dir={{w}}/out/locked", 2, r"in use by another align run \(pid \d+ on ",
             setup=lock_with(None)),
        Case("output_dir locked from another host", f"{sft} output_dir={{w}}/out/locked", 2,
             r"pid 4242 on far-away.*delete .*\.align-lock", setup=lock_with(4242, "far-away")),
        Case("output_dir with a lock left by a dead process", f"{sft} output_dir={{w}}/out/locked", 0,
             r"cleared a stale lock of pid \d+", setup=lock_with(-1)),
        # ----- parents and inputs
        Case("parent_run that does not exist", f"recipes/dpo.py --config {{dpo}} {out} parent_run={{w}}/nowhere", 2,
             r"parent_run: .*nowhere does not exist"),
        Case("parent_run that is someone else's folder (\"does not exist\" before)", f"recipes/dpo.py --config {{dpo}} {out} parent_run={{w}}/foreign/parent",
             2, r"parent_run: .* is not an align run dir", setup=lambda p: foreign_folder(p, "parent"), check=unchanged("parent")),
        Case("parent_run that is an empty folder", f"recipes/dpo.py --config {{dpo}} {out} parent_run={{w}}/emptydir", 2,
             r"is not an align run dir \(an empty folder\)", setup=lambda p: Path(p["w"], "emptydir").mkdir(exist_ok=True)),
        Case("reward_run that is an SFT run", f"{ppo} {out} reward_run={{runs}}/sft", 2, r"reward_run: .* is not a reward-model run"),
        Case("model that does not exist", f"{sft} {out} model.name_or_path={{w}}/no-model", 2, r"no such directory"),
        Case("model folder without config.json", f"{sft} {out} model.name_or_path={{w}}/not-a-model", 2, r"is not a model directory"),
        Case("`lora.target_modules: [q_prj]` (a PEFT dump after the run dir was written before)", f"{sft} {out} lora.target_modules=[q_prj]",
             2, r"lora.target_modules: \['q_prj'\]: not found in the model .*q_proj", check=lambda p, proc: _not_written(p)),
        Case("`lora.target_modules: [layers.0]` (a block, not a layer)", f"{sft} {out} lora.target_modules=[layers.0]", 2,
             r"lora.target_modules: .*not a layer this method adapts", check=lambda p, proc: _not_written(p)),
        Case("`peft.vera.target_modules: [nope]`", f"{sft} {out} peft.method=vera peft.vera.target_modules=[nope]", 2,
             r"peft.vera.target_modules: .*not found", check=lambda p, proc: _not_written(p)),
        # ----- data
        Case("data file missing", f"{sft} {out} data.path={{w}}/missing.jsonl", 2, r"data.path .*missing.jsonl.*file not found"),
        Case("data row without the required field", f"{sft} {out} data.path={{data}}/lacking.jsonl", 2, r"lacking.jsonl:3: field 'messages' missing"),
        Case("invalid JSON line", f"{sft} {out} data.path={{data}}/bad_json.jsonl", 2, r"bad_json.jsonl:2: malformed JSON"),
        Case("invalid UTF-8", f"{sft} {out} data.path={{data}}/bad_utf8.jsonl", 2, r"bad_utf8.jsonl:2: invalid UTF-8"),
        Case("unsupported file type", f"{sft} {out} data.path={{data}}/data.txt", 2, r"unsupported file type '.txt'"),
        Case("preference row without chosen", f"recipes/dpo.py --config {{dpo}} {out} data.path={{data}}/prefs_missing_chosen.jsonl", 2,
             r"field 'chosen' missing"),
        Case("split that does not exist", f"{sft} {out} data.train_split=nope", 2, r"no split 'nope'"),
        Case("DPO data with rows validate rejects (empty chosen, chosen == rejected, ...) (trained on before)",
             "recipes/dpo.py --config {dpo} output_dir={w}/out/dpo-bad-rows data.path={data}/prefs_with_bad_rows.jsonl train.max_steps=1",
             0, r"left out 5 of 29 rows that align-data validate rejects", check=dpo_counted),
        Case("DPO data whose every row validate rejects", f"recipes/dpo.py --config {{dpo}} {out} data.path={{data}}/prefs_all_bad.jsonl", 2,
             r"has no rows left after leaving out 4 that align-data validate rejects"),
        # ----- errors while a stage runs, secrets
        Case("a library error mid-run (a chat template that raises)", f"{sft} output_dir={{w}}/out/raising model.name_or_path={{raising}}", 1,
             r"error: sft failed .*this template refuses every conversation.*--debug", check=nothing_at("out/raising")),
        Case("the same with --debug", f"{sft} output_dir={{w}}/out/raising model.name_or_path={{raising}} --debug", 1, r"Traceback",
             traceback_ok=True),
        Case("secrets in the environment and on the command line (were in W&B's files before)",
             f"{sft} output_dir={{w}}/out/secret tracking=wandb wandb.tags=[hf_TypedOnTheCommandLine0987654321zy,correct-horse-battery-staple]"
             " wandb.name=run-hf_EnvironmentSecret1234567890abcd", 0, r"sft \(sft\) finished",
             env={"HF_TOKEN": "hf_EnvironmentSecret1234567890abcd", "ACME_PASSWORD": "correct-horse-battery-staple"}, check=no_secret),
        Case("PPO --resume from a checkpoint whose optimizer.pt holds a code-running pickle", "recipes/ppo.py --config {ppo_tampered} --resume",
             2, r"optimizer.pt: refused: not a checkpoint of plain data", check=no_marker("pickle_marker")),
        # ----- align (adapter lifecycle)
        Case("`align generate` with a run dir that asks for remote code (its code ran before)",
             "-m align generate --adapter x={remote_run} --prompt hi --max-new-tokens 2", 0, r"cannot turn remote code on", check=no_marker()),
        Case("`align merge` of that run dir", "-m align merge {remote_run} --output {w}/out/merged-remote", 0, r"merged .* into", check=no_marker()),
        Case("`align export` of that run dir (copied evil.py before)", "-m align export {remote_run} --output {w}/out/export-remote", 0,
             r"left out 1 item.*evil.py", check=lambda p, proc: no_marker()(p, proc) or _no_py(Path(p["w"]) / "out" / "export-remote")),
        Case("`align generate` with a malformed adapter_config.json", "-m align generate --adapter x={w}/adapters/broken_json --prompt hi", 2,
             r"adapter_config.json:1: invalid JSON"),
        Case("adapter_config.json that is a JSON list", "-m align generate --adapter x={w}/adapters/list_json --prompt hi", 2,
             r"expected a JSON object, got list"),
        Case("adapter_config.json without peft_type", "-m align merge {w}/adapters/no_type --output {w}/out/m", 2, r"no 'peft_type'"),
        Case("`align generate` with an adapter that does not exist", "-m align generate --adapter x={w}/nope --prompt hi", 2, r"no such file or folder"),
        Case("`align merge --output` someone else's folder", "-m align merge {runs}/sft --output {w}/foreign/merge-out", 2,
             r"--output: .* holds files align did not write", setup=lambda p: foreign_folder(p, "merge-out"), check=unchanged("merge-out")),
        Case("`align export --output` a file", "-m align export {runs}/sft --output {w}/a-file", 2, r"--output: .* is a file",
             setup=a_file),
        Case("`align generate --max-new-tokens 0`", "-m align generate --adapter x={runs}/sft --prompt hi --max-new-tokens 0", 2,
             r"--max-new-tokens: must be at least 1"),
        Case("`align generate --temperature -1`", "-m align generate --adapter x={runs}/sft --prompt hi --temperature -1", 2,
             r"--temperature: must be 0 \(greedy\) or positive"),
        Case("`align generate` without a prompt", "-m align generate --adapter x={runs}/sft", 2, r"no prompt given"),
        Case("`align combine` of one adapter", "-m align combine {runs}/sft --output {w}/out/comb", 2, r"give at least two adapters"),
        Case("`align combine --weights nan`", "-m align combine {runs}/sft {runs}/sft --weights nan 1 --output {w}/out/comb", 2,
             r"--weights: must be finite"),
        Case("`align export` of a folder that is not a run dir", "-m align export {w}/adapters/broken_json --output {w}/out/e", 2,
             r"invalid JSON"),
        # ----- align-data
        Case("`align-data validate` of an empty file (exit 0 before)", "-m data_tools validate {data}/empty.jsonl", 1, r"no rows"),
        Case("`align-data validate` of rows with chosen == rejected", "-m data_tools validate {data}/prefs_with_bad_rows.jsonl", 1,
             r"chosen identical to rejected"),
        Case("`align-data build --output` a folder with another tool's build.json", "-m data_tools build --format trl --input {data}/pairs.jsonl "
             "--output {w}/foreign/site --overwrite --no-plots", 2, r"not an align-data build",
             setup=lambda p: foreign_folder(p, "site", build_json=True), check=unchanged("site")),
        Case("`align-data build --output` a file", "-m data_tools build --format trl --input {data}/pairs.jsonl --output {w}/a-file --no-plots",
             2, r"exists and is not a folder", setup=a_file),
        Case("`align-data build --test-fraction 1`", "-m data_tools build --format trl --input {data}/pairs.jsonl --output {w}/out/b --test-fraction 1",
             2, r"--test-fraction: must be in \[0, 1\)"),
        Case("`align-data build --min-margin -1`", "-m data_tools build --format trl --input {data}/pairs.jsonl --output {w}/out/b --min-margin -1",
             2, r"--min-margin: must be >= 0"),
        Case("`align-data build` of a missing input", "-m data_tools build --format trl --input {w}/nope.jsonl --output {w}/out/b", 2, r"nope.jsonl"),
        Case("`align-data build` of a malformed line", "-m data_tools build --format trl --input {data}/bad_pairs.jsonl --output {w}/out/b", 2,
             r"bad_pairs.jsonl:2: malformed JSON"),
        Case("`align-data generate --num-samples 1`", "-m data_tools generate --model {tiny} --prompts {data}/sft.jsonl --num-samples 1 "
             "--judge format --output {w}/out/g", 2, r"--num-samples: at least 2"),
        Case("`align-data generate --top-p 0`", "-m data_tools generate --model {tiny} --prompts {data}/sft.jsonl --top-p 0 "
             "--judge format --output {w}/out/g", 2, r"--top-p: must be in \(0, 1\]"),
        Case("`align-data generate --max-new-tokens 0`", "-m data_tools generate --model {tiny} --prompts {data}/sft.jsonl --max-new-tokens 0 "
             "--judge format --output {w}/out/g", 2, r"--max-new-tokens: must be at least 1"),
    ]
    return c + issue22_cases()


YAML_FILES = {
    "dup_top": "output_dir: {w}/out/never\nmodel: {{name_or_path: {tiny}}}\ndata: {{path: {data}/sft.jsonl}}\ntrain:\n  batch_size: 2\ntrain:\n  epochs: 3\n",
    "dup_nested": "output_dir: {w}/out/never\nmodel: {{name_or_path: {tiny}}}\ndata: {{path: {data}/sft.jsonl}}\ntrain:\n  max_steps: 1\n  max_steps: 3\n",
    "recursive": "output_dir: {w}/out/never\nwandb: &w\n  tags: [*w]\n",
    "bomb": "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
            "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
    "invalid": "output_dir: [unclosed\n",
    "list": "- a\n- b\n",
    "empty": "",
    "range": "output_dir: {w}/out/never\nmodel: {{name_or_path: {tiny}}}\ndata: {{path: {data}/sft.jsonl}}\ntrain:\n  warmup_ratio: 5\n",
}


def yaml_file(p: dict, name: str, key: str) -> None:
    folder = Path(p["w"]) / "yaml"
    folder.mkdir(exist_ok=True)
    if key == "latin1":
        (folder / name).write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    else:
        (folder / name).write_text(YAML_FILES[key].format(**p))


def a_file(p: dict) -> None:
    """A plain file where a folder is expected (removing whatever an earlier case left there)."""
    path = Path(p["w"], "a-file")
    if path.is_dir():
        shutil.rmtree(path)
    path.write_text("x")


def nothing_at(rel: str):
    """The data is tokenized before the run dir is created: a library error there leaves nothing behind."""
    def check(p: dict, proc) -> str | None:
        return f"$W/{rel} was written" if Path(p["w"], rel).exists() else None
    return check


def _not_written(p: dict) -> str | None:
    return f"{p['w']}/out/never was written" if Path(p["w"], "out", "never").exists() else None


def _no_py(folder: Path) -> str | None:
    found = list(folder.glob("*.py"))
    return f"code copied: {found}" if found else None


# --------------------------------------------------------------------------- round two (issue 22)

NONFINITE_JUDGES = """\
def nan_judge(prompt, response):
    return float("nan")


def inf_judge(prompt, response):
    return float("inf")


def none_judge(prompt, response):
    return None
"""


def build_issue22_workspace(w: Path, c: Path, d: Path, runs: Path) -> dict[str, str]:
    """What the round-two cases add: online-stage configs, a judge module, long prompts, .gz data, an SFT
    run whose checkpoint holds a code-running pickle."""
    import gzip

    import torch
    from align.core.artifacts import RunDir
    from align.core.config_loader import load_config
    from align.stages.registry import run_stage
    from align.stages.sft import SFTConfig

    (w / "pymods").mkdir(exist_ok=True)
    (w / "pymods" / "nonfinite_judges.py").write_text(NONFINITE_JUDGES)
    long_text = " ".join(f"word{i}" for i in range(300))
    jsonl(d / "long_prompts.jsonl", [{"prompt": msgs("user", "What is 1 plus one?")}, {"prompt": msgs("user", long_text)},
                                      *({"prompt": msgs("user", f"What is {i} plus one?")} for i in range(2, 8))])
    (d / "sft.jsonl.gz").write_bytes(gzip.compress((d / "sft.jsonl").read_bytes()))
    (d / "prefs.jsonl.gz").write_bytes(gzip.compress((d / "prefs.jsonl").read_bytes()))
    (d / "prefs.parquet.gz").write_bytes(gzip.compress(b"not parquet"))
    common = {"samples": {"num_prompts": 2, "max_new_tokens": 4}, "tracking": "none"}
    child = {"parent_run": str(runs / "sft"), "data": {"path": str(d / "prefs.jsonl"), "eval_split": None, "eval_fraction": 0.25},
             "train": tiny_train(), **common}
    group = {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "eval_prompts": 0}
    for stage, extra in (("grpo", {"grpo": group}), ("rloo", {"rloo": group}),
                         ("online_dpo", {"online": {"rounds": 1, "num_samples": 2, "max_new_tokens": 4, "prompts_per_round": 4,
                                                    "generation_batch_size": 4, "eval_prompts": 0}})):
        write_yaml(c / f"{stage}.yaml", {"output_dir": str(w / "out" / stage), **child, "rewards": [{"judge": "format"}], **extra},
                   f"python recipes/{stage}.py --config {stage}.yaml")
    for stage in ("kto", "orpo", "simpo"):
        write_yaml(c / f"{stage}.yaml", {"output_dir": str(w / "out" / stage), **child}, f"python recipes/{stage}.py --config {stage}.yaml")
    write_yaml(c / "sweep_self.yaml", {"config": "sweep_self.yaml", "stage": "dpo", "values": {"beta": [0.1, 0.2]}},
               "python recipes/sweep.py --config sweep_self.yaml")
    write_yaml(c / "pipeline_self.yaml", {"name": "self", "output_dir": str(w / "out" / "pipeline-self"), "tracking": "none",
                                          "stages": [{"name": "sft", "stage": "sft", "config": "pipeline_self.yaml"}]},
               "python recipes/pipeline.py --config pipeline_self.yaml")
    write_yaml(c / "pipeline_sweep.yaml", {"name": "via-sweep", "output_dir": str(w / "out" / "pipeline-sweep"), "tracking": "none",
                                           "stages": [{"name": "dpo", "stage": "dpo", "config": "sweep_self.yaml"}]},
               "python recipes/pipeline.py --config pipeline_sweep.yaml")
    tampered = runs / "sft-tampered"
    if not (tampered / "checkpoints" / "checkpoint-2").is_dir():
        cfg = load_config(SFTConfig, c / "sft.yaml", {"output_dir": str(tampered), "train.save_steps": 1})
        run_stage(cfg)
    RunDir(tampered).update(status="interrupted")  # also after a replay that changed it
    torch.save({"state": LeavesAMarker(str(w / "SFT_PICKLE_RAN"))}, tampered / "checkpoints" / "checkpoint-2" / "optimizer.pt")
    return {name: str(c / f"{name}.yaml") for name in ("grpo", "rloo", "online_dpo", "kto", "orpo", "simpo", "sweep_self",
                                                        "pipeline_self", "pipeline_sweep")} | {
        "sft_pickle_marker": str(w / "SFT_PICKLE_RAN")}


def victim(name: str, source: str = "sft", status: str | None = None, inside: str | None = None, link: str | None = None):
    """A setup: a fresh copy of a finished run (runs/<source>) at victims/<name> (optionally with another status,
    with a second copy nested at <name>/<inside>, or with a symbolic link victims/<link> to it), its bytes recorded."""
    def setup(p: dict) -> None:
        from align.core.artifacts import RunDir

        root = Path(p["w"]) / "victims"
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(Path(p["runs"]) / source, folder, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
        if status:
            RunDir(folder).update(status=status)
        if inside:
            shutil.copytree(Path(p["runs"]) / source, folder / inside, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
        if link:
            (root / link).unlink(missing_ok=True)
            (root / link).symlink_to(folder, target_is_directory=True)
        p[f"victim:{name}"] = snapshot(folder)
    return setup


def intact(name: str):
    def check(p: dict, proc) -> str | None:
        folder = Path(p["w"]) / "victims" / name
        if not folder.is_dir():
            return f"{folder} is gone"
        now = snapshot(folder)
        before = p[f"victim:{name}"]
        if now == before:
            return None
        changed = sorted(set(now) ^ set(before)) or sorted(k for k in now if now[k] != before[k])
        return f"{folder} changed ({', '.join(changed[:3])})"
    return check


def fresh(rel: str):
    """A setup: <w>/out/<rel> removed (a case that writes a new run there)."""
    def setup(p: dict) -> None:
        shutil.rmtree(Path(p["w"]) / "out" / rel, ignore_errors=True)
    return setup


def both(*checks):
    def check(p: dict, proc) -> str | None:
        return next((found for found in (c(p, proc) for c in checks) if found), None)
    return check


def clean_message(p: dict, proc) -> str | None:
    """One plain line: no terminal colour codes, no advice on how to load a pickle anyway."""
    if "\x1b[" in proc.stderr:
        return "ANSI codes in the message"
    return "advice to load it anyway" if "weights_only" in proc.stderr else None


def distinct_runs(p: dict, proc) -> str | None:
    names = re.findall(r"^# run (\S+)$", proc.stdout, re.M)
    return None if len(names) >= 2 and len(set(names)) == len(names) else f"run names {names}"


SFT, DPO, PPO, GRPO = "recipes/sft.py --config {sft}", "recipes/dpo.py --config {dpo}", "recipes/ppo.py --config {ppo}", "recipes/grpo.py --config {grpo}"
V = "{w}/victims/"
LATE_NOTE = "late check: the target run must stay byte-identical"


def with_judge(spec: str, extra: str = "") -> str:
    """A `rewards=[...]` override with one judge source (YAML flow syntax, braces doubled for str.format)."""
    return "'rewards=[{{judge: \"" + spec + "\"" + extra + "}}]'"


def late(what: str, recipe: str, name: str, args: str, expect: str, extra=None, note: str = "") -> Case:
    """A check that ran after the run dir was reset: with --force (last: argparse) onto the finished run victims/<name>,
    which must stay byte-identical; `extra` sets up more (a reward run without its stats)."""
    def setup(p: dict) -> None:
        victim(name)(p)
        if extra:
            extra(p)
    label = f"{what} ({note}; {LATE_NOTE})" if note else f"{what} ({LATE_NOTE})"
    return Case(label, f"{recipe} output_dir={V}{name} {args} --force", 2, expect, setup=setup, check=intact(name))


def without_stats(name: str):
    """A setup: a copy of the reward run at victims/<name> without its reward_stats.json."""
    def setup(p: dict) -> None:
        victim(name, "reward")(p)
        (Path(p["w"]) / "victims" / name / "reward_stats.json").unlink()
    return setup


def issue22_cases() -> list[Case]:
    return ownership_cases() + late_check_cases() + nonfinite_cases() + wording_cases()


def ownership_cases() -> list[Case]:
    sft, dpo, ppo, grpo = SFT, DPO, PPO, GRPO
    return [
        Case("DPO `output_dir` equal to its `parent_run` (emptied the parent before)", f"{dpo} parent_run={V}own output_dir={V}own", 2,
             r"output_dir: .* is the parent_run", setup=victim("own"), check=intact("own")),
        Case("DPO `output_dir` inside its `parent_run`", f"{dpo} parent_run={V}host output_dir={V}host/dpo", 2,
             r"output_dir: .* is inside the parent_run", setup=victim("host"), check=intact("host")),
        Case("DPO `output_dir` a symbolic link to its `parent_run`", f"{dpo} parent_run={V}linked output_dir={V}link-to-linked", 2,
             r"output_dir: .* is the parent_run", setup=victim("linked", link="link-to-linked"), check=intact("linked")),
        Case("DPO `output_dir` a run dir that contains its `parent_run`", f"{dpo} parent_run={V}outer/nested output_dir={V}outer", 2,
             r"output_dir: .* contains the parent_run", setup=victim("outer", inside="nested"), check=intact("outer")),
        Case("PPO `output_dir` equal to its `reward_run`", f"{ppo} reward_run={V}own-reward output_dir={V}own-reward", 2,
             r"output_dir: .* is the reward_run", setup=victim("own-reward", "reward"), check=intact("own-reward")),
        Case("PPO `output_dir` inside its `reward_run`", f"{ppo} reward_run={V}host-reward output_dir={V}host-reward/ppo", 2,
             r"output_dir: .* is inside the reward_run", setup=victim("host-reward", "reward"), check=intact("host-reward")),
        Case("eval `output_dir` equal to one of its `runs`", f"recipes/eval.py --config {{eval}} 'runs={{{{sft: {V}evaluated}}}}' output_dir={V}evaluated",
             2, r"output_dir: .* is the runs.sft", setup=victim("evaluated"), check=intact("evaluated")),
        Case("GRPO `output_dir` equal to a reward source's `reward_run`",
             f"{grpo} 'rewards=[{{{{reward_run: {V}scorer}}}}]' output_dir={V}scorer", 2, r"output_dir: .* is the rewards\[0\].reward_run",
             setup=victim("scorer", "reward"), check=intact("scorer")),
        Case("SFT `output_dir` a symbolic link to another finished run (--force)", f"{sft} output_dir={V}link-to-elsewhere --force", 2,
             r"output_dir: .* is a symbolic link", setup=victim("elsewhere", link="link-to-elsewhere"), check=intact("elsewhere")),
        Case("--resume with a changed config on a finished run (replaced it before)",
             f"{sft} output_dir={V}resumed train.learning_rate=0.001 --resume", 2, r"resume: .* finished", setup=victim("resumed"),
             check=intact("resumed")),
        Case("a changed config into a finished run's folder without --force", f"{sft} output_dir={V}changed train.learning_rate=0.001", 2,
             r"output_dir: .* holds a finished sft run .*--force", setup=victim("changed"), check=intact("changed")),
        Case("DPO into the folder of a finished SFT run (not its parent) without --force", f"{dpo} output_dir={V}other-stage", 2,
             r"output_dir: .* holds a finished sft run", setup=victim("other-stage"), check=intact("other-stage")),
    ]


def late_check_cases() -> list[Case]:
    sft, dpo, ppo, grpo = SFT, DPO, PPO, GRPO
    too_short, too_long = r"no training row is left within max_length=8", r"long_prompts.jsonl:2: the prompt is \d+ tokens"
    long_prompts = "data.path={data}/long_prompts.jsonl"
    return [
        late("SFT: no row fits `train.max_length`", sft, "late-sft", "train.max_length=8", too_short),
        late("DPO: no pair fits `train.max_length`", dpo, "late-dpo", "train.max_length=8", too_short),
        late("reward: no pair fits `train.max_length`", "recipes/reward.py --config {reward}", "late-rm", "train.max_length=8", too_short),
        late("KTO: no row fits `train.max_length`", "recipes/kto.py --config {kto}", "late-kto", "train.max_length=8", too_short),
        late("ORPO: no pair fits `train.max_length`", "recipes/orpo.py --config {orpo}", "late-orpo", "train.max_length=8", too_short),
        late("SimPO: no pair fits `train.max_length`", "recipes/simpo.py --config {simpo}", "late-simpo", "train.max_length=8", too_short),
        late("GRPO: a prompt longer than `train.max_length`", grpo, "late-grpo", long_prompts, too_long,
             note="an out-of-memory error mid-run before"),
        late("RLOO: a prompt longer than `train.max_length`", "recipes/rloo.py --config {rloo}", "late-rloo", long_prompts, too_long),
        late("online DPO: a prompt longer than `train.max_length`", "recipes/online_dpo.py --config {online_dpo}", "late-odpo",
             long_prompts, too_long),
        late("PPO: a prompt longer than `train.max_length`", ppo, "late-ppo", long_prompts, too_long),
        late("GRPO: a judge given arguments it does not take", grpo, "late-args", "'rewards=[{{judge: length, args: {{max_wordz: 3}}}}]'",
             r"rewards\[0\].judge: judge 'length' does not take these arguments"),
        late("GRPO: a reward run without reward_stats.json", grpo, "late-stats", f"'rewards=[{{{{reward_run: {V}no-stats}}}}]'",
             r"rewards\[0\].reward_run: cannot read .*reward_stats.json", extra=without_stats("no-stats")),
        late("PPO: a reward run without reward_stats.json", ppo, "late-ppo-stats", f"reward_run={V}no-stats-ppo",
             r"reward_run: cannot read .*reward_stats.json", extra=without_stats("no-stats-ppo"), note="a library error after the reset before"),
        Case("SFT --resume from a checkpoint whose optimizer.pt holds a code-running pickle (the trainer's own loading)",
             "recipes/sft.py --config {sft} output_dir={runs}/sft-tampered train.save_steps=1 --resume", 2,
             r"optimizer.pt: refused: .*pickle", check=both(no_marker("sft_pickle_marker"), clean_message,
                                                            manifest_status("runs", "sft-tampered", "interrupted"))),
    ]


def nonfinite_cases() -> list[Case]:
    sft, dpo, grpo, judge = SFT, DPO, GRPO, with_judge
    return [
        Case("SFT `train.learning_rate: 1e308` (finished with a NaN adapter before)",
             f"{sft} output_dir={{w}}/out/nan-sft train.learning_rate=1e308 train.max_steps=1", 2, r"non-finite .*step 1",
             setup=fresh("nan-sft"), check=manifest_status("w", "out/nan-sft", "failed")),
        Case("DPO `train.learning_rate: 1e308`", f"{dpo} output_dir={{w}}/out/nan-dpo train.learning_rate=1e308 train.max_steps=1", 2,
             r"non-finite .*step 1", setup=fresh("nan-dpo"), check=manifest_status("w", "out/nan-dpo", "failed")),
        Case("GRPO `train.learning_rate: 1e308`", f"{grpo} output_dir={{w}}/out/nan-grpo train.learning_rate=1e308 train.max_steps=1", 2,
             r"non-finite .*step 1", setup=fresh("nan-grpo"), check=manifest_status("w", "out/nan-grpo", "failed")),
        Case("a learning rate above 1 warns before training", f"{sft} train.learning_rate=3 --print-config", 0,
             r"train.learning_rate: 3 is above 1"),
        Case("DPO whose `parent_run` failed", f"{dpo} parent_run={V}failed-parent output_dir={{w}}/out/never", 2,
             r"parent_run: .* is not finished \(status: failed\)", setup=victim("failed-parent", status="failed")),
        Case("`align merge` of a failed run", f"-m align merge {V}failed-merge --output {{w}}/out/merged-failed", 2,
             r"failed-merge: the run failed\b.*--allow-failed", setup=victim("failed-merge", status="failed")),
        Case("`align merge --allow-failed` of a failed run", f"-m align merge {V}failed-merge2 --output {{w}}/out/merged-failed2 --allow-failed",
             0, r"merged .* into", setup=lambda p: (victim("failed-merge2", status="failed")(p), fresh("merged-failed2")(p))),
        Case("`align export` of a failed run (exported without a word before)", f"-m align export {V}failed-export --output {{w}}/out/export-failed",
             2, r"failed-export: the run failed\b.*--allow-failed", setup=victim("failed-export", status="failed")),
        Case("`align export` of a run that is still running", f"-m align export {V}running --output {{w}}/out/export-running", 2,
             r"running: the run is still running", setup=victim("running", status="running")),
        Case("`align combine` with a failed run", f"-m align combine {{runs}}/sft {V}failed-combine --output {{w}}/out/comb-failed", 2,
             r"failed-combine: the run failed", setup=victim("failed-combine", status="failed")),
        Case("GRPO judge that returns NaN (was 'does not apply' before)", f"{grpo} output_dir={{w}}/out/judge-nan {judge('nonfinite_judges:nan_judge')}",
             2, r"rewards\[0\]: judge 'nonfinite_judges:nan_judge' returned nan for the prompt", setup=fresh("judge-nan"),
             check=manifest_status("w", "out/judge-nan", "failed")),
        Case("GRPO judge that returns inf (advantage 0 before)", f"{grpo} output_dir={{w}}/out/judge-inf {judge('nonfinite_judges:inf_judge')}",
             2, r"rewards\[0\]: judge 'nonfinite_judges:inf_judge' returned inf for the prompt", setup=fresh("judge-inf")),
        Case("GRPO judge NaN with `nonfinite: default` and `default: 0` (opted in)",
             f"{grpo} output_dir={{w}}/out/judge-nan-ok {judge('nonfinite_judges:nan_judge', ', nonfinite: default, default: 0')}", 0,
             r"grpo \(grpo\) finished", setup=fresh("judge-nan-ok")),
        Case("GRPO judge that scores no response in the whole run (said nothing before)",
             f"{grpo} output_dir={{w}}/out/judge-none {judge('nonfinite_judges:none_judge')}", 2, r"no response was scored in the whole run",
             setup=fresh("judge-none"), check=manifest_status("w", "out/judge-none", "failed")),
        Case("RLOO judge that scores no response in the whole run",
             f"recipes/rloo.py --config {{rloo}} output_dir={{w}}/out/rloo-none {judge('nonfinite_judges:none_judge')}", 2,
             r"no response was scored in the whole run", setup=fresh("rloo-none")),
        Case("online DPO judge that returns NaN",
             f"recipes/online_dpo.py --config {{online_dpo}} output_dir={{w}}/out/odpo-nan {judge('nonfinite_judges:nan_judge')}", 2,
             r"rewards\[0\]: judge 'nonfinite_judges:nan_judge' returned nan", setup=fresh("odpo-nan")),
    ]


def wording_cases() -> list[Case]:
    sft, dpo, grpo = SFT, DPO, GRPO
    return [
        Case("a reward source's weight given on the command line (blamed on the YAML before)",
             f"{grpo} output_dir={{w}}/out/never 'rewards=[{{{{judge: format, weight: 0}}}}]'", 2,
             r"^error: command line: rewards\[0\].weight: must be a finite non-zero number"),
        Case("an indexed override `rewards[0].weight=0`", f"{grpo} output_dir={{w}}/out/never rewards[0].weight=0", 2,
             r"^error: command line: rewards\[0\].weight: must be a finite non-zero number"),
        Case("an indexed override past the list's end", f"{grpo} output_dir={{w}}/out/never rewards[3].weight=2", 2,
             r"^error: command line: rewards\[3\].weight: rewards has 1 entry"),
        Case("an indexed override naming an unknown judge", f"{grpo} output_dir={{w}}/out/never rewards[0].judge=nosuch", 2,
             r"^error: command line: rewards\[0\].judge: .*unknown judge 'nosuch'"),
        Case("sweep values that differ past the sixth digit (one folder, 'the same value' before)",
             f"recipes/sweep.py --config {{dpo}} --values lr=0.1000001,0.1000002 --print-config", 0, r"# run lr=0\.1000001",
             check=distinct_runs),
        Case("sweep values that are the same folder name after cleaning", f"recipes/sweep.py --config {{dpo}} '--values=wandb.project=a b,a-b' --print-config",
             0, r"# run project=a-b", check=distinct_runs),
        Case("a sweep file that names itself as its stage config", "recipes/sweep.py --config {sweep_self}", 2, r"includes itself"),
        Case("a pipeline whose stage config is the pipeline file", "recipes/pipeline.py --config {pipeline_self}", 2,
             r"stages\[0\].config: .* includes itself"),
        Case("a pipeline whose stage config is a sweep file", "recipes/pipeline.py --config {pipeline_sweep}", 2,
             r"stages\[0\].config: .* is a sweep file"),
        Case("PPO tampered checkpoint: the refusal is one plain line (ANSI codes and load-anyway advice before)",
             "recipes/ppo.py --config {ppo_tampered} --resume", 2, r"optimizer.pt: refused: .*pickle",
             check=both(no_marker("pickle_marker"), clean_message)),
        Case("`align-data validate` of a .jsonl.gz", "-m data_tools validate {data}/prefs.jsonl.gz", 0, r"24 rows"),
        Case("SFT on a .jsonl.gz (align-data read it, the recipes refused it before)",
             f"{sft} output_dir={{w}}/out/gz data.path={{data}}/sft.jsonl.gz", 0, r"sft \(sft\) finished", setup=fresh("gz")),
        Case("`align-data validate` of a .parquet.gz (read by neither)", "-m data_tools validate {data}/prefs.parquet.gz", 2,
             r"unsupported file type '\.parquet\.gz'.*align-data and the recipes read"),
        Case("SFT on a .parquet.gz", f"{sft} output_dir={{w}}/out/never data.path={{data}}/prefs.parquet.gz", 2,
             r"unsupported file type '\.parquet\.gz'.*align-data and the recipes read"),
    ]


# --------------------------------------------------------------------------- running


def run_case(case: Case, p: dict, timeout: int) -> dict:
    if case.setup:
        try:
            case.setup(p)
        except Exception as exc:  # noqa: BLE001 - an earlier case may have damaged what this one sets up
            return {"case": case, "rc": "-", "message": f"setup failed: {exc}", "ok": False, "problems": ["setup failed"],
                    "seconds": 0.0}
    argv = shlex.split(case.command.format(**p))
    argv = [str(REPO / argv[0])] + argv[1:] if argv[0].startswith("recipes/") else argv
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{Path(p['w']) / 'pymods'}", "WANDB_MODE": "offline", "HF_MODULES_CACHE": str(Path(p["w"]) / "hf-modules"),
           "ALIGN_TEST_MARKER": "", **case.env}
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=p["w"], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"case": case, "rc": "timeout", "message": f"no answer in {timeout} s", "ok": False, "problems": ["timeout"],
                "seconds": timeout}
    seconds = time.time() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    text = proc.stdout + "\n" + proc.stderr
    problems = []
    if proc.returncode != case.rc:
        problems.append(f"exit {proc.returncode}, expected {case.rc}")
    if case.rc == 2 and len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    haystack = errors[0] if case.rc == 2 and errors else text
    if not re.search(case.expect, haystack):
        problems.append("expected words missing")
    if "Traceback" in proc.stderr and not case.traceback_ok:
        problems.append("traceback")
    if case.check:
        found = case.check(p, proc)
        if found:
            problems.append(found)
    if errors:
        message = errors[0]
    else:
        match = re.search(case.expect, text)
        message = match.group(0) if match else (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [""])[-1]
    return {"case": case, "rc": proc.returncode, "message": message, "ok": not problems, "problems": problems, "seconds": seconds}


def shorten(text: str, n: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(results: list[dict], p: dict, before: dict | None = None) -> str:
    def anonymize(text: str) -> str:
        return text.replace(p["w"], "$W").replace(str(REPO), ".")

    lines = ["| # | bad input | command | exit | message (shortened) | verdict |", "| ---: | --- | --- | ---: | --- | --- |"]
    if before is not None:
        lines = [lines[0] + " before: exit | before: message (shortened) |", lines[1] + " ---: | --- |"]
    for i, r in enumerate(results, 1):
        case = r["case"]
        command = anonymize(case.command.format(**p)).replace(sys.executable, "python")
        command = ("align" + command[len("-m align"):]) if command.startswith("-m align") else command
        command = ("align-data" + command[len("-m data_tools"):]) if command.startswith("-m data_tools") else command
        verdict = "ok" if r["ok"] else "FAIL: " + "; ".join(r.get("problems", []))
        row = f"| {i} | {cell(case.name)} | `{cell(shorten(command, 110))}` | {r['rc']} | {cell(shorten(anonymize(r['message'])))} | {verdict} |"
        if before is not None:
            old = before.get(case.name)
            row += f" {old['rc']} | {cell(shorten(old['message'], 110))} |" if old else " | (not run) |"
        lines.append(row)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", help="write the markdown table here (default: stdout)")
    ap.add_argument("--work", help="workspace folder (default: a new temporary one)")
    ap.add_argument("--only", help="run only cases whose input matches this regex")
    ap.add_argument("-j", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--results", help="also write each result as a JSON line here (input, exit, message, verdict)")
    ap.add_argument("--before", help="a --results file of another checkout (e.g. main before a change): adds its columns")
    args = ap.parse_args()
    w = Path(args.work or tempfile.mkdtemp(prefix="align-bad-inputs-")).resolve()
    print(f"workspace {w}: building (tiny model, data, runs)", file=sys.stderr)
    p = build_workspace(w)
    selected = [c for c in cases() if not args.only or re.search(args.only, c.name)]
    print(f"{len(selected)} cases", file=sys.stderr)
    # Cases that share a folder run one after another; the rest in parallel.
    serial = [c for c in selected if c.setup or c.check or c.rc != 2]
    parallel = [c for c in selected if c not in serial]
    results: dict[int, dict] = {}
    with ThreadPoolExecutor(max_workers=max(1, args.j)) as pool:
        futures = {id(c): pool.submit(run_case, c, p, args.timeout) for c in parallel}
        for c in serial:
            results[id(c)] = run_case(c, p, args.timeout)
            print(f"  {'ok  ' if results[id(c)]['ok'] else 'FAIL'} {c.name}", file=sys.stderr)
        for c in parallel:
            results[id(c)] = futures[id(c)].result()
    for child in p.get("_children", []):
        child.kill()
    ordered = [results[id(c)] for c in selected]
    ok = sum(r["ok"] for r in ordered)
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            for r in ordered:
                f.write(json.dumps({"input": r["case"].name, "rc": r["rc"], "message": r["message"].replace(p["w"], "$W"),
                                    "ok": r["ok"], "problems": r.get("problems", [])}) + "\n")
    before = None
    if args.before:
        before = {row["input"]: row for row in map(json.loads, Path(args.before).read_text().splitlines())}
    head = (f"{len(ordered)} bad inputs, {ok} handled as expected, {len(ordered) - ok} not. Exit status 2: refused as bad input "
            "(one `error:` line, nothing written); 1: a library error inside a stage or problems found by validate; 0: the input "
            "was safely ignored or counted (see the message). $W is the workspace folder.\n\n")
    text = head + table(ordered, p, before) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"table written to {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0 if ok == len(ordered) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: a tiny random-init Llama with the real SmolLM2 tokenizer, tiny datasets.

Tests never download anything. The tokenizer comes from the embedded default model
(converted once per machine into ALIGN_CACHE_DIR, ~30 s the first time).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Tests run offline and never report to a W&B server.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist (`make test`) each worker gets its share of the cores: torch's default of one
# thread per core in every worker would oversubscribe them. Set before torch is imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# DPO's reference log-prob cache: one fresh folder per test session, never the user's.
os.environ["ALIGN_REF_CACHE_DIR"] = tempfile.mkdtemp(prefix="align-ref-cache-")

LN2 = math.log(2)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from align.modeling.models import embedded_model_dir

    return embedded_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer Llama (hidden 64) that speaks the SmolLM2 tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"{i} plus one is {i + 1}."},
            ]
        }
        for i in range(n)
    ]


def preference_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus one? Reply with only the answer."}],
            "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
            "rejected": [{"role": "assistant", "content": f"Adding one to {i} gives {i + 1}, as you can check."}],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny-data")
    return {
        "sft": write_jsonl(folder / "sft.jsonl", sft_rows(24)),
        "prefs": write_jsonl(folder / "prefs.jsonl", preference_rows(24)),
    }


def tiny_overrides(model_dir: Path, data: Path, output_dir: Path, **extra) -> dict:
    """Overrides that make any stage config a seconds-long CPU run on the tiny model."""
    base = {
        "output_dir": str(output_dir),
        "data.path": str(data),
        "data.eval_split": None,
        "data.eval_fraction": 0.25,
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.learning_rate": 5e-3,
        "train.warmup_ratio": 0.0,
        "train.logging_steps": 1,
        "train.max_length": 64,
        "samples.num_prompts": 2,
        "samples.max_new_tokens": 4,
        "wandb.group": "tests",
        "wandb.project": "align-tests",
    }
    if model_dir is not None:
        base["model.name_or_path"] = str(model_dir)
    base.update(extra)
    return base


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def sft_parent(tmp_path_factory, tiny_model_dir, tiny_data) -> Path:
    """A finished SFT run on the tiny model: the parent of child-stage tests."""
    from align.core.config_loader import load_config
    from align.stages.sft import SFTConfig
    from align.stages.registry import run_stage

    out = tmp_path_factory.mktemp("parent") / "sft"
    run_stage(load_config(SFTConfig, None, tiny_overrides(tiny_model_dir, tiny_data["sft"], out, tracking="none")))
    return out


# ---------------------------------------------------------------- longest files first (make test)
# xdist hands each worker whole files in collection order (`--no-loadscope-reorder`); starting
# the longest ones first keeps one long file from running alone at the end while the other cores
# idle. The seconds are a serial run's on the 2-core machine; only their order matters.
FILE_SECONDS = REPO / "tests" / "file_seconds.json"


def _file_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_addoption(parser):
    parser.addoption("--record-file-seconds", action="store_true",
                     help=f"write each test file's seconds in this run to {FILE_SECONDS.name}")


def pytest_collection_modifyitems(session, config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the order changes nothing, keep the files' own
    seconds = json.loads(FILE_SECONDS.read_text())
    items.sort(key=lambda item: -seconds.get(_file_of(item.nodeid), 0.0))  # stable: a file's tests keep their order


_recorded: dict[str, float] = {}


def pytest_runtest_logreport(report):
    file = _file_of(report.nodeid)
    _recorded[file] = _recorded.get(file, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--record-file-seconds") and not os.environ.get("PYTEST_XDIST_WORKER"):
        table = json.loads(FILE_SECONDS.read_text())
        table.update({file: round(total, 1) for file, total in _recorded.items()})
        FILE_SECONDS.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")

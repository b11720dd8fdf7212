"""Sweeps: the grid, its names and key resolution; bad values refused before anything runs; two tiny DPO runs
that share the reference cache, then an eval over both and the baseline; a rerun skips everything."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import yaml
from conftest import REPO

from align.cli import sweep as S
from align.cli import sweep_grid as G
from align.core.errors import ConfigError
from align.stages.registry import all_stages

SHIPPED = REPO / "recipes" / "configs" / "smollm2-135m"


# --------------------------------------------------------------------------- the grid and its names


def test_every_kl_knob_is_a_ranged_number_of_its_stage():
    from align.core.config import StageConfig, field_check

    knobs = {name: s.kl_knob for name, s in all_stages().items() if s.kl_knob}
    for stage, key in knobs.items():
        cls = all_stages()[stage].config
        leaf = G._leaf_paths(cls)
        assert leaf.get(key) is float, f"{stage}: {key}"
        section, name = key.split(".")
        f = next(f for f in cls.__dataclass_fields__[section].default_factory().__dataclass_fields__.values() if f.name == name)
        check = field_check(f)
        assert check is not None and (check.gt == 0 or check.min == 0), f"{stage}: {key} has no lower bound"
        assert G.resolve_key(stage, "beta") == key and G.resolve_key(stage, "kl") == key
    # A new training stage that pulls towards a reference must say which key does (sft and reward have none).
    training = {n for n, s in all_stages().items() if issubclass(s.config, StageConfig)}
    assert training - set(knobs) == {"sft", "reward"}


def test_keys_resolve_per_stage_and_unknown_ones_name_the_closest():
    assert G.resolve_key("ppo", "beta") == "ppo.kl_coef"
    assert G.resolve_key("rloo", "kl_coef") == "rloo.kl_coef"
    assert G.resolve_key("online_dpo", "beta") == "dpo.beta"
    assert G.resolve_key("sft", "lr") == "train.learning_rate" == G.resolve_key("dpo", "learning_rate")
    assert G.resolve_key("dpo", "lora.r") == "lora.r"
    with pytest.raises(ConfigError, match=r"^--values bta: not a key of the dpo config \(did you mean 'beta'\?\)$"):
        G.resolve_key("dpo", "bta")
    with pytest.raises(ConfigError, match=r"did you mean 'train.learning_rate'"):
        G.resolve_key("dpo", "train.learnig_rate")
    with pytest.raises(ConfigError, match=r"^--values beta: stage sft has no KL knob"):
        G.resolve_key("sft", "beta")
    with pytest.raises(ConfigError, match="set by the sweep"):
        G.resolve_key("dpo", "output_dir")


def test_values_names_and_grid_order():
    assert G.parse_values(["beta=0.05,0.1", "lr=1e-4, 3.0e-4", "dpo.loss_type=sigmoid,ipo"]) == {
        "beta": [0.05, 0.1], "lr": ["1e-4", 3e-4], "dpo.loss_type": ["sigmoid", "ipo"]}
    for bad, needle in (("beta", "expected key=value1"), ("beta=", "expected key=value1"), ("beta=0.1,,0.2", "an empty value")):
        with pytest.raises(ConfigError, match=needle):
            G.parse_values([bad])
    with pytest.raises(ConfigError, match="given twice"):
        G.parse_values(["beta=1", "beta=2"])
    assert [G.format_value(v) for v in (3e-4, 0.1, 1e-05, 16, True, "a b/c", ["x", "y"], None)] == [
        "0.0003", "0.1", "1e-05", "16", "true", "a-b-c-" + hashlib.sha256(b"a b/c").hexdigest()[:6], "x+y", "null"]
    assert G.labels(["dpo.beta", "train.learning_rate", "lora.dropout", "train.dropout"]) == {
        "dpo.beta": "beta", "train.learning_rate": "lr", "lora.dropout": "lora.dropout", "train.dropout": "train.dropout"}
    a = G.Axis("dpo.beta", "beta", (0.1, 0.3), "")
    b = G.Axis("train.learning_rate", "lr", (1e-4, 3e-4), "")
    names = [G.run_name([(ax.label, v) for ax, v in combo]) for combo in G.grid([a, b])]
    assert names == ["beta=0.1_lr=0.0001", "beta=0.1_lr=0.0003", "beta=0.3_lr=0.0001", "beta=0.3_lr=0.0003"]


def test_the_shipped_sweep_plans_six_dpo_runs_and_an_eval():
    sweep = S.load_sweep(str(SHIPPED / "sweep-dpo.yaml"), [], None, None, {})
    assert sweep.stage == "dpo" and sweep.group == "smollm2-135m-dpo-sweep"
    assert [p.name for p in sweep.points][:2] == ["beta=0.05_lr=0.0001", "beta=0.05_lr=0.0003"] and len(sweep.points) == 6
    p = sweep.points[-1]
    assert p.cfg.dpo.beta == 0.3 and p.cfg.train.learning_rate == pytest.approx(3e-4)
    assert p.cfg.output_dir.endswith("dpo-sweep/beta=0.3_lr=0.0003") and p.cfg.wandb.group == sweep.group
    ev = sweep.eval_cfg
    assert ev.runs["sft"] == "runs/smollm2-135m/sft" and set(ev.runs) == {"sft", *(p.name for p in sweep.points)}
    assert ev.num_prompts == 64 and ev.wandb.group == sweep.group and ev.output_dir.endswith("dpo-sweep/eval")


# --------------------------------------------------------------------------- refused before anything runs


@pytest.mark.parametrize("args, needle", [
    (["--values", "beta=0.1,-1"], "error: --values beta: dpo.beta: must be positive, got -1.0"),
    (["--values", "bta=0.1"], "error: --values bta: not a key of the dpo config (did you mean 'beta'?)"),
    (["--values", "lr=0,1e-4"], "error: --values lr: train.learning_rate: must be positive, got 0"),
    (["--values", "lr=1e-4,0.0001"], "error: --values lr: '1e-4' and 0.0001 are the same value (lr=0.0001)"),
    (["--values", "beta=0.1", "wandb.group=x"], "error: command line: wandb.group: set by the sweep"),
    (["--values", "beta=0.1", "train.max_steps=0"], "error: command line: train.max_steps: must be at least 1, got 0"),
    (["--values", "beta=0.1", "--stage", "dpoo"], "error: unknown stage 'dpoo' (did you mean 'dpo'?)"),
    (["--values", "beta=0.1", "--eval", str(SHIPPED / "eval.yaml"), "eval.num_prompts=0"],
     "error: eval.num_prompts override: num_prompts: must be at least 1, got 0"),
    ([], "error: --values: required with a stage config (dpo.yaml)"),
])
def test_bad_sweeps_exit_2_naming_the_key_and_write_nothing(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = S.main(["--config", str(SHIPPED / "dpo.yaml"), f"output_dir={tmp_path / 'sweep'}", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(needle), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_in_a_sweep_yaml_names_its_line(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"config: {SHIPPED / 'dpo.yaml'}\noutput_dir: {tmp_path / 'out'}\nvalues:\n  beta: [0.1]\n  lr: [-1.0]\n")
    assert S.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}:5: values.lr: train.learning_rate: must be positive, got -1.0"
    path.write_text(f"config: {SHIPPED / 'dpo.yaml'}\nvalues:\n  beta: 0.1\n")
    assert S.main(["--config", str(path)]) == 2
    assert f"{path}:3: values.beta: a non-empty list of values" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_run_dir_is_refused(tmp_path, capsys):
    from align.core.artifacts import _write_marker

    (tmp_path / "run").mkdir()
    _write_marker(tmp_path / "run")
    assert S.main(["--config", str(SHIPPED / "dpo.yaml"), "--values", "beta=0.1", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "is an align run dir; a sweep's folder holds one run dir per grid point" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real sweep


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_two_dpo_runs_share_the_reference_cache_then_eval_and_a_rerun_skips(tmp_path, sft_parent, tiny_data, capsys):
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump({
        "output_dir": "unused", "parent_run": str(sft_parent), "tracking": "none",
        "data": {"path": str(tiny_data["prefs"]), "eval_split": None, "eval_fraction": 0.25},
        "train": {"max_steps": 1, "batch_size": 4, "max_length": 64, "warmup_ratio": 0.0, "logging_steps": 1},
        "samples": {"num_prompts": 1, "max_new_tokens": 2},
        "dpo": {"ref_cache_dir": str(tmp_path / "ref-cache")},  # empty: the first run computes every reference
    }))
    (tmp_path / "eval.yaml").write_text(
        f"output_dir: unused\ntracking: none\nruns: {{}}\ndata:\n  path: {tiny_data['prefs']}\n  eval_split: null\n"
        f"  eval_fraction: 0.25\nperplexity_data: {tiny_data['sft']}\nnum_prompts: 3\nnum_pairs: 3\nperplexity_rows: 2\n"
        "bootstrap: 50\njudges: [format, length]\nsampling:\n  max_new_tokens: 4\nkl_budgets: [0.0, 100.0]\n")
    root = tmp_path / "sweep"
    argv = ["--config", str(tmp_path / "dpo.yaml"), "--values", "beta=0.1", "--values", "lr=5e-3,2e-2",
            "--eval", str(tmp_path / "eval.yaml"), f"output_dir={root}", "name=tiny-sweep"]
    caplog = _Lines()
    align_log = logging.getLogger("align")
    level = align_log.level
    align_log.addHandler(caplog)
    align_log.setLevel(logging.INFO)
    try:
        assert S.main(argv) == 0, capsys.readouterr().err[-3000:]
        first_log = caplog.text
        record = json.loads((root / "sweep.json").read_text())
        caplog.lines.clear()
        capsys.readouterr()
        assert S.main(argv) == 0  # the same command again
    finally:
        align_log.removeHandler(caplog)
        align_log.setLevel(level)
    names = ["beta=0.1_lr=0.005", "beta=0.1_lr=0.02"]
    assert [r["name"] for r in record["runs"]] == names and record["stage"] == "dpo"
    for r in record["runs"]:
        cfg = yaml.safe_load((root / r["name"] / "config.yaml").read_text())
        assert cfg["wandb"]["group"] == "tiny-sweep" and cfg["wandb"]["name"] == f"tiny-sweep-{r['name']}"
        assert r["status"] == "finished" and not r["skipped"]
    first, second = record["runs"]
    assert yaml.safe_load((root / names[1] / "config.yaml").read_text())["train"]["learning_rate"] == pytest.approx(2e-2)
    # The second run asked the cache for the same pairs and got every one of them from it.
    assert first["ref_cache_misses"] > 0
    assert second["ref_cache_misses"] == 0 and second["ref_cache_hits"] == first["ref_cache_hits"] + first["ref_cache_misses"]
    assert "sweep: reference cache: 1 of 1 runs after the first reused it" in first_log
    summary = json.loads((root / names[1] / "manifest.json").read_text())["summary"]
    assert summary["ref_cache_hits"] == second["ref_cache_hits"]

    results = json.loads((root / "eval" / "eval.json").read_text())
    assert set(results["policies"]) == {"sft", *names}
    frontier = results["frontier"]
    assert frontier["score"] == "format" and set(frontier["runs"]) == {"sft", *names}
    assert [b["kl_budget"] for b in frontier["budgets"]] == [0.0, 100.0]
    best = max(frontier["runs"].values(), key=lambda p: p["score"])["score"]
    assert frontier["budgets"][1]["score"] == best  # the whole plane fits the larger budget
    assert all(0 <= results["policies"][n]["distinct_2"] <= 1 for n in names if results["policies"][n]["distinct_2"] is not None)
    md = (root / "report.md").read_text()
    assert "## Frontier" in md and "distinct-2" in md and all(n in md for n in names)

    # The same command again: every run and the eval are finished and match, so nothing reruns.
    again = json.loads((root / "sweep.json").read_text())
    assert [r["run_id"] for r in again["runs"]] == [r["run_id"] for r in record["runs"]]
    assert all(r["skipped"] for r in again["runs"])
    assert "eval: skipped" in caplog.text
    assert capsys.readouterr().out.count("skipped, already finished") == 2

"""The shape of the library: package layers, no import circle, stages as peers, small functions and modules,
and a stage registry everything derives from."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "align"


def module_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """align module -> the align modules it imports (function-level imports too; `if TYPE_CHECKING:` left out)."""
    modules = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        resolved = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def stage_modules() -> set[str]:
    from align.stages.registry import all_stages

    return {stage.run.__module__ for stage in all_stages().values()}


def test_the_import_graph_has_no_circle():
    assert cycles(module_imports()) == []


# --------------------------------------------------------------------------- package layers

# Each package of align and its layer: a package imports only packages of lower layers.
LAYERS = {"core": 0, "modeling": 1, "preference": 2, "rlhf": 2, "evaluation": 2, "stages": 3, "cli": 4}
# The imports allowed between packages of one layer, listed once, each with why.
SIDEWAYS = {
    ("rlhf", "preference"): "online DPO trains each round with the DPO trainer (align/preference/dpo_setup.py)",
    ("rlhf", "evaluation"): "reward sources score the policy's samples with the evaluation's judges",
}
# `align` itself and `python -m align` sit on top of every layer.
TOP = ("align", "align.__main__")


def package_of(module: str) -> str:
    return module if module in TOP else module.split(".")[1]


def layer_climbs(graph: dict[str, set[str]]) -> list[str]:
    """Every import that climbs a package layer (or goes sideways without being listed in SIDEWAYS)."""
    climbs = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            a, b = package_of(importer), package_of(target)
            if a == b or importer in TOP:
                continue
            if b in TOP or LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and (a, b) not in SIDEWAYS):
                climbs.append(f"{importer} -> {target}")
    return climbs


def test_every_package_has_a_layer():
    assert {package_of(m) for m in module_imports()} - set(TOP) == set(LAYERS)


def test_no_import_climbs_a_package_layer():
    assert layer_climbs(module_imports()) == []


def test_every_allowed_sideways_import_is_used():
    graph = module_imports()
    used = {(package_of(a), package_of(b)) for a, targets in graph.items() for b in targets}
    assert set(SIDEWAYS) <= used, "an allowance nobody needs any more: remove it from SIDEWAYS"


@pytest.mark.parametrize("where, planted, climb", [
    ("core/errors.py", "from align.modeling.models import ModelRef", "align.core.errors -> align.modeling.models"),
    ("evaluation/metrics.py", "from align.rlhf.losses import masked_mean", "align.evaluation.metrics -> align.rlhf.losses"),
    ("stages/sft.py", "from align.cli.sweep import plan", "align.stages.sft -> align.cli.sweep"),
])
def test_the_layer_check_finds_a_planted_climb(tmp_path, where, planted, climb):
    """A copy of align with one import planted inside a function: the check names it."""
    shutil.copytree(PACKAGE, tmp_path / "align", ignore=shutil.ignore_patterns("__pycache__", "bundled", "configs"))
    path = tmp_path / "align" / where
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    assert layer_climbs(module_imports(tmp_path / "align")) == [climb]


# --------------------------------------------------------------------------- sizes

MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
# A longer module says why in its docstring, with these words.
COHESIVE = "one cohesive module"


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line name (n lines)` of every function (decorators included) longer than `limit` lines."""
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > limit:
                    shown = path.relative_to(REPO) if REPO in path.parents else path.name
                    out.append(f"{shown}:{node.lineno} {node.name} ({node.end_lineno - start + 1} lines)")
    return out


def test_no_function_over_80_lines():
    assert long_functions(python_files("align", "data_tools")) == []


def test_the_function_check_finds_a_long_one(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}")
    assert long_functions([tmp_path / "long.py"]) == [f"long.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_module_over_500_lines_unless_it_says_why():
    too_long = []
    for path in python_files("align"):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES and COHESIVE not in (ast.get_docstring(ast.parse(text)) or "").lower():
            too_long.append(f"{path.relative_to(REPO)} ({len(text.splitlines())} lines)")
    assert too_long == []


def test_no_stage_imports_another_stage():
    graph = module_imports()
    stages = stage_modules()
    assert {"align.stages.sft", "align.stages.dpo", "align.stages.eval"} <= stages
    crossing = {(a, b) for a in stages for b in graph[a] if b in stages}
    assert crossing == set()


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_configs_load_without_torch_or_trl():
    """Config errors come in a fraction of a second: the registry and every stage config import no heavy library."""
    code = (
        "import sys\n"
        "from align.stages.registry import all_stages\n"
        "from align.core.config_loader import describe\n"
        "for stage in all_stages().values(): describe(stage.config)\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- a throwaway stage

TOY_MODULE = '''
"""A throwaway stage: writes a greeting into its RunDir."""

from dataclasses import dataclass

from align.core.config import RunConfig, opt
from align.stages.registry import Stage, prepare_config, register


@dataclass
class ToyConfig(RunConfig):
    """Says hello into a RunDir."""

    greeting: str = opt("hello", "What to write.")
    repeat: int = opt(1, "How often.")

    stage = "toy"


def run(cfg, *, force=False, callbacks=()):
    from pathlib import Path

    from align.core.artifacts import RunDir

    from align.core.files import atomic_write_text
    from align.core.config_loader import to_dict, to_yaml

    cfg = prepare_config(cfg)
    run_dir = RunDir.start(Path(cfg.output_dir), stage="toy", config=to_dict(cfg), config_yaml=to_yaml(cfg),
                           run_key="toy", parent=None, base_model={}, dataset={})
    atomic_write_text(run_dir.path / "greeting.txt", " ".join([cfg.greeting] * cfg.repeat))
    run_dir.finish(summary={"words": cfg.repeat}, outputs={"greeting": "greeting.txt"})
    return run_dir


def summary_lines(s):
    return [f"  wrote {s['words']} words"]


register(Stage("toy", ToyConfig, run, summary_lines))
'''


@pytest.fixture()
def package_with_toy_stage(tmp_path) -> Path:
    """A copy of align with one new module in align/stages: nothing else is edited."""
    root = tmp_path / "src"
    shutil.copytree(PACKAGE, root / "align", ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    (root / "align" / "stages" / "toy.py").write_text(textwrap.dedent(TOY_MODULE))
    return root


def run_align(root: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_a_new_stage_module_reaches_the_cli_and_the_pipeline(package_with_toy_stage, tmp_path):
    root = package_with_toy_stage
    listed = run_align(root, "-m", "align", "--help", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split() == ["toy", "Says", "hello", "into", "a", "RunDir."] for line in listed.stdout.splitlines())
    keys = run_align(root, "-m", "align", "toy", "--keys", cwd=tmp_path)
    assert keys.returncode == 0, keys.stderr
    assert "greeting (a string, default 'hello'): What to write." in keys.stdout

    (tmp_path / "toy.yaml").write_text("output_dir: runs/toy\ntracking: none\nrepeat: 2\n")
    bad = run_align(root, "-m", "align", "toy", "--config", "toy.yaml", "greting=hi", cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean 'greeting'" in bad.stderr
    ran = run_align(root, "-m", "align", "toy", "--config", "toy.yaml", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "runs/toy/greeting.txt").read_text() == "hello hello"
    assert "wrote 2 words" in ran.stdout

    (tmp_path / "pipeline.yaml").write_text(
        "name: p\noutput_dir: runs/p\ntracking: none\nstages:\n"
        "  - {name: first, stage: toy, config: toy.yaml, overrides: {greeting: hi}}\n"
    )
    piped = run_align(root, "-m", "align", "pipeline", "--config", "pipeline.yaml", cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert (tmp_path / "runs/p/first/greeting.txt").read_text() == "hi hi"
    assert json.loads((tmp_path / "runs/p/first/manifest.json").read_text())["status"] == "finished"


def test_registering_a_stage_in_process_feeds_the_loader_and_pipeline_names(tmp_path):
    from align.cli.pipeline import load_pipeline
    from align.core.config import RunConfig, opt
    from align.core.errors import ConfigError
    from align.stages.registry import Stage, all_stages, get_stage, load_stage_config, register, unregister

    @dataclass
    class EchoConfig(RunConfig):
        """Echo."""

        times: int = opt(1, "Times.")

        stage = "echo"

    register(Stage("echo", EchoConfig, run=lambda cfg, **kw: None, summary=lambda s: []))
    try:
        assert "echo" in all_stages() and get_stage("echo").config is EchoConfig
        (tmp_path / "echo.yaml").write_text("output_dir: o\ntimes: 3\n")
        assert load_stage_config("echo", tmp_path / "echo.yaml").times == 3
        (tmp_path / "p.yaml").write_text("name: p\noutput_dir: o\nstages:\n  - {name: e, stage: echo, config: echo.yaml}\n")
        assert load_pipeline(tmp_path / "p.yaml").stage_configs["e"][1].times == 3
    finally:
        unregister("echo")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.stage: unknown stage 'echo'"):
        load_pipeline(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match="did you mean 'sft'"):
        get_stage("sfx")

"""`align`: the one command line (also `python -m align`).

    align <stage> --config X.yaml [key=value ...] [--keys] [--resume] [--force]
    align pipeline | sweep | compare-methods --config X.yaml ...
    align merge | export | generate | combine | push | lm-eval ...
    align configs list | copy MODEL DIR

The stage commands are read from the stage registry (align.stages.registry): a stage module
that registers itself is a command, with its config's first docstring paragraph as its line
in `align --help`. Every other command is one entry of COMMANDS below, naming the module that
parses its own arguments; modules are imported only when their command runs, so `align --help`
and config errors never wait for torch.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    """A command that is not a stage: `module.function(argv, prog=...)` returns the exit status."""

    name: str
    group: str
    help: str
    module: str
    function: str = "main"
    # The commands of align/cli/lifecycle.py share one parser; they get their name as argv[0].
    pass_name: bool = False

    def call(self, argv: list[str]) -> int:
        entry = getattr(importlib.import_module(self.module), self.function)
        if self.pass_name:
            return entry([self.name, *argv])
        return entry(argv, prog=f"align {self.name}")


WORKFLOWS = "Workflows (several stages)"
RUNS = "Runs and adapters"
RECIPES = "Recipes"

COMMANDS = (
    Command("pipeline", WORKFLOWS, "the stages of a pipeline YAML in order; finished matching stages are skipped",
            "align.cli.recipes", "pipeline_main"),
    Command("sweep", WORKFLOWS, "one stage over a grid of values (its KL knob, learning rate, any key), then an eval",
            "align.cli.sweep"),
    Command("compare-methods", WORKFLOWS, "the same SFT (and DPO) with each PEFT method, side by side",
            "align.cli.compare"),
    Command("merge", RUNS, "an adapter folded into its base, saved as safetensors", "align.cli.lifecycle", pass_name=True),
    Command("export", RUNS, "a run's adapter in standard PEFT format with a model card", "align.cli.lifecycle", pass_name=True),
    Command("generate", RUNS, "answers from one base with several named adapters", "align.cli.lifecycle", pass_name=True),
    Command("combine", RUNS, "a weighted combination of LoRA adapters of one base", "align.cli.lifecycle", pass_name=True),
    Command("push", RUNS, "a finished run on the Hugging Face Hub: adapter or merged model, tokenizer, model card",
            "align.cli.push"),
    Command("lm-eval", RUNS, "lm-evaluation-harness tasks on a finished run's model (base and adapter loaded once)",
            "align.cli.benchmarks"),
    Command("configs", RECIPES, "the shipped recipe configs: list them, copy a model's folder to edit", "align.cli.configs"),
)


def canonical(name: str) -> str:
    """Commands are spelled with hyphens, stages and recipes/<name>.py with underscores: either works."""
    return name.replace("-", "_")


def _stage_lines() -> list[tuple[str, str]]:
    from align.stages.registry import all_stages

    return [(name, " ".join(stage.description.split())) for name, stage in all_stages().items()]


def usage() -> str:
    rows: list[tuple[str, list[tuple[str, str]]]] = [
        ("Stages (align <stage> --config X.yaml [key=value ...]; --keys lists a stage's keys)", _stage_lines())
    ]
    for group in dict.fromkeys(c.group for c in COMMANDS):
        rows.append((group, [(c.name, c.help) for c in COMMANDS if c.group == group]))
    width = max(len(name) for _, lines in rows for name, _ in lines) + 2
    out = [
        "usage: align <command> [options]   (align <command> --help for its options)",
        "",
        "Alignment of language models with LoRA: SFT, preference optimization, RLHF, evaluation.",
    ]
    for title, lines in rows:
        out += ["", f"{title}:"]
        out += [f"  {name:<{width}}{_one_line(text, 98 - width)}" for name, text in lines]
    out += ["", "Start: align configs copy smollm2-135m ./c && align sft --config ./c/sft.yaml"]
    return "\n".join(out)


def _one_line(text: str, limit: int) -> str:
    """A description within `limit` columns: its first clause when the whole is longer."""
    if len(text) > limit:
        text = text.split("; ")[0]
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def resolve(name: str) -> Callable[[list[str]], int] | None:
    """The entry point of a command or stage name, or None."""
    from align.stages.registry import all_stages

    stages = all_stages()
    for command in COMMANDS:
        if canonical(command.name) == canonical(name):
            if canonical(command.name) in stages:
                raise RuntimeError(f"stage '{command.name}' has the name of a built-in align command")
            return command.call
    if canonical(name) in stages:
        stage = canonical(name)

        def run_stage(argv: list[str]) -> int:
            from align.cli.recipes import recipe_main

            return recipe_main(stage, argv, prog=f"align {stage}")

        return run_stage
    return None


def command_for_script(script: str) -> str | None:
    """The `align` command that recipes/<script>.py runs, or None for a checkout-only script."""
    from align.stages.registry import all_stages

    if script in all_stages():
        return script
    return next((c.name for c in COMMANDS if canonical(c.name) == canonical(script)), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    entry = resolve(name)
    if entry is None:
        from align.stages.registry import all_stages

        known = [*all_stages(), *(c.name for c in COMMANDS)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{name}'{hint}; `align --help` lists the commands", file=sys.stderr)
        return 2
    return entry(rest)


if __name__ == "__main__":
    sys.exit(main())

"""`align`: the adapter lifecycle on the command line (also `python -m align`).

    align merge    SOURCE --output DIR [--base MODEL]
    align export   RUN --output DIR
    align generate --adapter NAME=SOURCE [--adapter ...] (--prompt TEXT ... | --prompts FILE)
                   [--use NAME] [--with-base] [--max-new-tokens N] [--output FILE.jsonl]
    align combine  SOURCE SOURCE [...] --weights W W [...] [--type linear|cat|svd] --output DIR

A SOURCE is a RunDir (its adapter/, base model and model settings are read from it) or
a plain PEFT adapter folder (its base from adapter_config.json). What a run dir says is data:
its `model.trust_remote_code` is never honoured; `--trust-remote-code` (merge, generate,
combine) is the only way a base's own code runs. A RunDir that did not finish (failed,
interrupted) is refused by merge, export and combine unless `--allow-failed` is given; one still
running is refused always. `--output` is a new or empty folder, or one this command wrote before. Bad input prints one line and exits with status 2; any other error
is one line with exit status 1, and `--debug` prints its traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from align.core.errors import ConfigError


def _check_finished(spec: str, allow_failed: bool) -> None:
    """A RunDir source must have finished (a failed run's adapter may be partial or non-finite); --allow-failed overrides."""
    from align.core.artifacts import RunDir
    from align.core.run_lock import check_finished

    run = RunDir(Path(spec))
    if run.is_run_dir():
        check_finished(run, allow_failed)


def _mb(folder: Path) -> str:
    from align.modeling.adapters import adapter_bytes

    return f"{adapter_bytes(folder) / 2**20:.2f} MB"


# --------------------------------------------------------------------------- merge


def cmd_merge(args) -> int:
    """Adapter folded into its base, saved as full-precision safetensors (a 4-bit base is dequantized first)."""
    from align.core.artifacts import check_replaceable
    from align.modeling import models
    from align.modeling.adapters import merge_adapter
    from align.modeling.adapter_sets import resolve_adapter

    out = Path(args.output)
    check_replaceable(out, "--output")
    _check_finished(args.source, args.allow_failed)
    source = resolve_adapter(args.source, args.base, trust_remote_code=args.trust_remote_code)
    tokenizer = models.load_tokenizer(source.base, source.model_cfg)
    merge_adapter(source.base, source.model_cfg, source.adapter_dir, out, tokenizer, mark="merge")
    quant = source.model_cfg.quantization
    note = f" (base loaded {quant}, dequantized before merging)" if quant != "none" else ""
    print(f"merged {source.adapter_dir} into {source.base.name}{note}: {out} ({_mb(out)} of safetensors)")
    return 0


# --------------------------------------------------------------------------- export


# What an exported adapter folder may hold: data a PEFT/transformers load reads without running code.
# Anything else in a run's adapter/ (a .py file, a pickled .bin, ...) is left out and named.
EXPORTED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")


def cmd_export(args) -> int:
    """The run's adapter in standard PEFT format plus a model card (README.md)."""
    from align.core.artifacts import check_replaceable, mark_output
    from align.core.files import atomic_dir
    from align.modeling.adapter_sets import resolve_adapter
    from align.modeling.model_card import model_card

    out = Path(args.output)
    check_replaceable(out, "--output")
    _check_finished(args.run, args.allow_failed)
    source = resolve_adapter(args.run)
    if source.run is None:
        raise ConfigError(f"{args.run}: export takes a RunDir (the model card is written from its manifest)")
    left_out = []
    with atomic_dir(out) as tmp:
        for item in sorted(source.adapter_dir.iterdir()):
            if item.name == "README.md" or item.name.startswith(".align-"):
                continue
            if item.is_file() and not item.is_symlink() and item.suffix in EXPORTED_SUFFIXES:
                shutil.copy2(item, tmp / item.name)
            else:
                left_out.append(item.name)
        (tmp / "README.md").write_text(model_card(source.run), encoding="utf-8")
        mark_output(tmp, "export")
    if left_out:
        print(f"left out {len(left_out)} item(s) of {source.adapter_dir} that are not adapter data: {', '.join(left_out)}",
              file=sys.stderr)
    params = ((source.run.manifest() or {}).get("summary") or {}).get("parameters") or {}
    print(
        f"exported {source.adapter_dir} -> {out}: {params.get('trainable', 0):,} trainable of {params.get('total', 0):,} "
        f"parameters ({params.get('trainable_pct')}%), {_mb(out)} on disk, model card {out / 'README.md'}"
    )
    return 0


# --------------------------------------------------------------------------- generate


def _read_requests(args) -> list[tuple[list[dict], str | None]]:
    """(chat prompt, adapter name or None) per request, from --prompt texts or a --prompts file."""
    requests: list[tuple[list[dict], str | None]] = [([{"role": "user", "content": p}], None) for p in args.prompt or []]
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ConfigError(f"--prompts: {path}: no such file")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                requests.append(([{"role": "user", "content": line}], None))
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}:{lineno}: a row is {{\"prompt\": text or messages, \"adapter\": optional name}}") from None
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            requests.append((messages, row.get("adapter")))
    if not requests:
        raise ConfigError("--prompt / --prompts: no prompt given")
    return requests


def _named_sources(specs: list[str]) -> dict[str, str]:
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if name in named:
            raise ConfigError(f"--adapter: the name '{name}' is used twice")
        named[name] = path
    return named


def cmd_generate(args) -> int:
    """One base, several named adapters: each request through the adapter it names, or side by side."""
    from align.modeling.adapter_sets import AdapterSet, check_same_base, resolve_adapter
    from align.modeling.generation import Sampling

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):
        raise ConfigError(f"--temperature: must be 0 (greedy) or positive, got {args.temperature}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed: must be in [0, 4294967295], got {args.seed}")
    sources = {
        name: resolve_adapter(path, args.base, trust_remote_code=args.trust_remote_code)
        for name, path in _named_sources(args.adapter).items()
    }
    if args.base is None:
        check_same_base(sources)
    requests = _read_requests(args)
    first = next(iter(sources.values()))
    adapters = AdapterSet(first.base, {name: s.adapter_dir for name, s in sources.items()}, first.model_cfg)
    side_by_side = list(adapters.names) + ([AdapterSet.BASE] if args.with_base else [])
    plan = [(i, name) for i, (_, picked) in enumerate(requests) for name in ([args.use or picked] if (args.use or picked) else side_by_side)]
    sampling = Sampling(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0, seed=args.seed
    )
    responses: dict[tuple[int, str], str] = {}
    for name in dict.fromkeys(name for _, name in plan):  # one batched pass per adapter
        indices = [i for i, n in plan if n == name]
        for i, text in zip(indices, adapters.generate([requests[i][0] for i in indices], name, sampling)):
            responses[(i, name)] = text
    rows = [{"prompt": requests[i][0], "adapter": name, "response": responses[(i, name)]} for i, name in plan]
    for i, (prompt, _) in enumerate(requests):
        print(f"### {prompt[-1]['content']}")
        for row in (r for (j, _), r in zip(plan, rows) if j == i):
            print(f"[{row['adapter']}] {row['response']}")
        print()
    if args.output:
        from align.core.files import atomic_write_text

        atomic_write_text(Path(args.output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{len(rows)} responses written to {args.output}")
    return 0


# --------------------------------------------------------------------------- combine


def cmd_combine(args) -> int:
    """Weighted combination of LoRA adapters of one base, saved as a new adapter."""
    import math

    from align.core.artifacts import check_replaceable
    from align.modeling.adapter_sets import combine_adapters, resolve_adapter

    check_replaceable(Path(args.output), "--output")
    if args.weights is not None and not all(math.isfinite(w) for w in args.weights):
        raise ConfigError(f"--weights: must be finite numbers, got {args.weights}")
    for spec in args.sources:
        _check_finished(spec, args.allow_failed)
    sources = [resolve_adapter(s, args.base, trust_remote_code=args.trust_remote_code) for s in args.sources]
    weights = args.weights if args.weights is not None else [1.0 / len(sources)] * len(sources)
    out = combine_adapters(sources, weights, args.type, Path(args.output))
    print(f"combined {len(sources)} adapters ({args.type}, weights {weights}) -> {out} ({_mb(out)})")
    return 0


# --------------------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align", description="Adapter lifecycle: merge, export, generate, combine.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    unfinished = argparse.ArgumentParser(add_help=False)
    unfinished.add_argument(
        "--allow-failed", action="store_true",
        help="also take a run that failed or was interrupted (its adapter may be partial or non-finite); never one still running",
    )
    loads = argparse.ArgumentParser(add_help=False)
    loads.add_argument(
        "--trust-remote-code", action="store_true",
        help="let the base model's own Python code run (its auto_map); never taken from a run dir's config",
    )

    m = sub.add_parser("merge", help=cmd_merge.__doc__, parents=[common, loads, unfinished])
    m.add_argument("source", help="a RunDir or an adapter folder")
    m.add_argument("--output", required=True, help="folder for the merged safetensors model")
    m.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser("export", help=cmd_export.__doc__, parents=[common, unfinished])
    e.add_argument("run", help="a RunDir with adapter/")
    e.add_argument("--output", required=True, help="folder for the adapter and its README.md")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help=cmd_generate.__doc__, parents=[common, loads])
    g.add_argument("--adapter", action="append", required=True, metavar="NAME=SOURCE", help="an adapter to load (repeat)")
    g.add_argument("--base", help="base model for every adapter (default: theirs, which must be the same)")
    g.add_argument("--prompt", action="append", help="a user message (repeat)")
    g.add_argument("--prompts", help=".jsonl of {prompt, adapter?} rows (a row's adapter picks it), or a text file of lines")
    g.add_argument("--use", help="send every prompt to this adapter ('base' for none)")
    g.add_argument("--with-base", action="store_true", help="side by side: also answer with every adapter off")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--output", help="also write the responses as JSON lines")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("combine", help=cmd_combine.__doc__, parents=[common, loads, unfinished])
    c.add_argument("sources", nargs="+", help="LoRA adapters (RunDirs or folders) trained on the same base")
    c.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default: equal, summing to 1)")
    c.add_argument("--type", default="linear", help="linear (equal ranks), cat (exact weighted sum) or svd")
    c.add_argument("--base", help="base model (default: the adapters' own)")
    c.add_argument("--output", required=True, help="folder for the combined adapter")
    c.set_defaults(func=cmd_combine)
    return p


def main(argv: list[str] | None = None) -> int:
    from align.cli.recipes import guarded, setup_logging

    args = parser().parse_args(argv)
    setup_logging()
    return guarded(lambda: args.func(args), debug=args.debug, command=f"align {args.command}")


if __name__ == "__main__":
    sys.exit(main())

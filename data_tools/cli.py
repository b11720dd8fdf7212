"""`align-data` (also `python -m data_tools`): build, check and describe preference datasets.

Subcommands:
  build     turn a public or generic dataset into clean pairs (TRL conversational format), or with
            --kind unpaired into KTO rows {prompt, completion, label}
  generate  on-policy pairs: sample K responses per prompt from a model, score them with a judge
  validate  list every problem of a canonical preference dataset, with its row
  stats     the stats report of a canonical preference dataset
  demo      regenerate the bundled demo datasets (demo_sft, demo_prefs) of the default recipes

Bad input prints one line `error: ...` (file, line, field) and exits with status 2.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Sequence

from align.core.errors import AlignError, ConfigError


def _weights(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected attribute=weight[,attribute=weight...], got {text!r}")
    return out


def _add_build_options(p: argparse.ArgumentParser, with_format: bool = True) -> None:
    from data_tools.dedup import NEAR_DUP_METHODS
    from align.core.pairing import STRATEGIES

    if with_format:
        from data_tools.sources import FORMATS

        p.add_argument("--format", required=True, metavar="FMT", help=f"input format: {', '.join(FORMATS)}")
        p.add_argument("--input", required=True, action="append", metavar="PATH_OR_HUB_ID",
                       help="a .jsonl/.json/.csv/.parquet file (.gz too), a folder of them, a save_to_disk "
                            "dataset, or a hub dataset id (repeat for several)")
        p.add_argument("--split", action="append", dest="source_splits", metavar="NAME",
                       help="read only this split of a hub id, saved dataset or folder (repeatable; default all)")
        p.add_argument("--hub-config", help="hub dataset configuration name")
        p.add_argument("--limit", type=int, help="read at most N input rows")
        p.add_argument("--skip-invalid", action="store_true",
                       help="skip unreadable rows (counted by reason in the report) instead of stopping")
    p.add_argument("--output", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier align-data build at --output")

    k = p.add_argument_group("unpaired rows (KTO)")
    k.add_argument("--kind", default="pairs", choices=("pairs", "unpaired"),
                   help="pairs (default) or unpaired: one row per response, {prompt, completion, label}, for KTO")
    k.add_argument("--label-threshold", type=float, metavar="T",
                   help="unpaired: a rated response is desirable when its score >= T (on the source's scale); "
                        "without it, pairs are labelled by side (chosen desirable, rejected undesirable)")

    g = p.add_argument_group("pairing (rated and ranked sources)")
    g.add_argument("--pairing", default="best-vs-worst", choices=STRATEGIES, help="default best-vs-worst")
    g.add_argument("--min-margin", type=float, default=0.0, help="smallest score difference of a pair (ties never pair)")

    if with_format:
        f = p.add_argument_group("format options")
        for col, help_ in (
            ("prompt", "prompt column (pairs, ratings, ranked, thumbs; default prompt)"),
            ("chosen", "chosen column (pairs; default chosen)"),
            ("rejected", "rejected column (pairs; default rejected)"),
            ("response", "response column, one row per response (ratings, ranked; default response; "
                         "thumbs: default completion, else response)"),
            ("label", "thumbs-up/down label column (thumbs; default label, else thumbs_up, or thumbs_down inverted)"),
            ("score", "score column, higher is better (ratings; default score)"),
            ("rank", "rank column, 1 is best (ranked; default rank)"),
            ("responses", "column with a list of responses, one row per prompt (ratings, ranked)"),
            ("scores", "column with the list of scores for --responses-col (ratings; default scores)"),
            ("ranks", "column with the list of ranks for --responses-col (ranked; default ranks)"),
            ("system", "column with a system message (pairs, ratings, ranked, thumbs)"),
            ("id", "id column (pairs, ratings, ranked, thumbs)"),
            ("chosen-score", "chosen score column (pairs)"),
            ("rejected-score", "rejected score column (pairs)"),
        ):
            f.add_argument(f"--{col}-col", help=help_)
        f.add_argument("--uf-score", help="ultrafeedback: fine-grained (default), overall, mean-aspects, or one aspect "
                                          "(instruction_following, honesty, truthfulness, helpfulness)")
        f.add_argument("--shp-min-ratio", type=float, help="shp: keep pairs whose score_ratio is at least this")
        f.add_argument("--helpsteer-weights", type=_weights, metavar="ATTR=W,...",
                       help="helpsteer: score = weighted sum of the 0-4 ratings (default helpfulness=1)")
        f.add_argument("--pku-preference", help="pku-saferlhf: which label picks chosen: better (default) or safer")
        f.add_argument("--pku-require-safe-chosen", action="store_true", default=None,
                       help="pku-saferlhf: drop pairs whose chosen response is labelled unsafe")
        f.add_argument("--oasst-lang", action="append", metavar="LANG", help="oasst: keep prompts in this language (repeatable)")

    c = p.add_argument_group("cleaning")
    c.add_argument("--near-dup", default="minhash", choices=NEAR_DUP_METHODS, help="near-duplicate prompts (default minhash)")
    c.add_argument("--near-dup-threshold", type=float, default=0.8, help="Jaccard similarity of a near duplicate (default 0.8)")
    c.add_argument("--near-dup-ngram", type=int, default=3, help="word n-gram size of the shingles (default 3)")
    c.add_argument("--tokenizer", help="tokenizer for lengths (model alias, hub id or folder); default: words")
    c.add_argument("--max-prompt-tokens", type=int, help="drop pairs whose prompt is longer")
    c.add_argument("--max-response-tokens", type=int, help="drop pairs whose chosen or rejected is longer")
    c.add_argument("--max-total-tokens", type=int, help="drop pairs whose prompt + longer response is longer")
    c.add_argument("--decontaminate", action="append", default=[], metavar="EVAL_SET",
                   help="drop pairs that share a word n-gram with this evaluation set's prompts (repeatable)")
    c.add_argument("--decontam-ngram", type=int, default=13, help="n-gram size for --decontaminate (default 13)")

    s = p.add_argument_group("split and output")
    s.add_argument("--test-fraction", type=float, default=0.05, help="share of prompts held out as 'test' (default 0.05)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    s.add_argument("--jsonl", action="store_true", help="also write jsonl/<split>.jsonl")
    s.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    s.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result to this hub dataset repo")
    s.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def _build_config(args, fmt: str, inputs: list[str], command: str):
    from data_tools.build import BuildConfig
    from data_tools.clean import CleanOptions
    from data_tools.sources.base import SourceOptions

    source = SourceOptions(**{k: getattr(args, k, None) for k in SourceOptions.__dataclass_fields__})
    clean = CleanOptions(
        near_dup=args.near_dup, near_dup_threshold=args.near_dup_threshold, near_dup_ngram=args.near_dup_ngram,
        tokenizer=args.tokenizer, max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens, max_total_tokens=args.max_total_tokens,
        decontaminate=list(args.decontaminate), decontam_ngram=args.decontam_ngram,
    )
    return BuildConfig(
        format=fmt, inputs=inputs, output=args.output,
        source_splits=getattr(args, "source_splits", None), hub_config=getattr(args, "hub_config", None),
        limit=getattr(args, "limit", None), skip_invalid=getattr(args, "skip_invalid", False), overwrite=args.overwrite,
        source=source, pairing=args.pairing, min_margin=args.min_margin, clean=clean,
        test_fraction=args.test_fraction, seed=args.seed, jsonl=args.jsonl, plots=args.plots,
        push_to_hub=args.push_to_hub, private=args.private, command=command,
        kind=args.kind, label_threshold=args.label_threshold,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align-data", description="Build preference datasets for align.")
    commands = p.add_subparsers(dest="command", required=True)

    b = commands.add_parser("build", help="build clean preference pairs (or KTO's unpaired rows) from a dataset",
                            description="Build clean preference pairs (TRL conversational format) from a dataset, "
                                        "or with --kind unpaired unpaired rows {prompt, completion, label} for KTO.")
    _add_build_options(b)

    g = commands.add_parser("generate", help="on-policy pairs: sample K responses per prompt, judge, pair",
                            description="Sample K responses per prompt from a model (optionally with an adapter), "
                                        "score them with a judge, and pair them.")
    g.add_argument("--model", required=True, help="model: alias (smollm2-135m-instruct), hub id, folder, or an SFT RunDir (its merged/)")
    g.add_argument("--adapter", help="a PEFT adapter folder or a RunDir with adapter/")
    g.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or rows with prompt / messages (any input format)")
    g.add_argument("--num-samples", type=int, default=4, help="responses per prompt, K (default 4)")
    g.add_argument("--judge", required=True, help="format, refusal, length, answer, module:function, or rm:<RunDir>")
    g.add_argument("--judge-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for a built-in judge (e.g. max_words=20)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    g.add_argument("--sample-seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    _add_build_options(g, with_format=False)

    v = commands.add_parser("validate", help="list every problem of a canonical preference dataset")
    v.add_argument("path", help="a built folder, a saved dataset, a folder of split files, or one file")
    v.add_argument("--split", action="append", dest="splits", metavar="NAME", help="check only this split (repeatable)")

    s = commands.add_parser("stats", help="the stats report of a canonical preference dataset")
    s.add_argument("path", help="a built folder, a saved dataset, a folder of split files, or one file")
    s.add_argument("--split", action="append", dest="splits", metavar="NAME", help="only this split (repeatable)")
    s.add_argument("--tokenizer", help="tokenizer for lengths (default: words)")
    s.add_argument("--near-dup", default="minhash", choices=("minhash", "ngram", "normalized", "off"))
    s.add_argument("--near-dup-threshold", type=float, default=0.8)
    s.add_argument("--near-dup-ngram", type=int, default=3)
    s.add_argument("--output", help="also write stats.md and plots/*.png into this folder")

    d = commands.add_parser("demo", help="generate the bundled demo datasets (demo_sft, demo_prefs)")
    d.add_argument("--output-dir", required=True, help="where demo_sft/ and demo_prefs/ are written")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def _command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "align-data " + " ".join(shlex.quote(a) for a in args)


def _on_sigterm(signum, frame):  # noqa: ARG001
    # A terminated build unwinds like Ctrl-C, so its temporary folder is removed.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        try:
            return _run(args, _command_line(argv))
        except AlignError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted: no output was written", file=sys.stderr)
            return 130
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        # The signal came while reporting or restoring the handler, after the work
        # ended either way: still exit as interrupted, never with a traceback.
        print("interrupted", file=sys.stderr)
        return 130


def _run(args, command: str) -> int:
    if args.command == "build":
        from data_tools.build import build

        build(_build_config(args, args.format, args.input, command))
        return 0
    if args.command == "generate":
        from data_tools.generate import GenerateConfig, generate

        if args.num_samples < 2:
            raise ConfigError(f"--num-samples: at least 2 responses per prompt are needed to pair, got {args.num_samples}")
        for flag, value, ok, what in (
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
            ("--temperature", args.temperature, 0 < args.temperature < float("inf"), "positive (sampling)"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
            ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
            ("--sample-seed", args.sample_seed, 0 <= args.sample_seed < 2**32, "in [0, 4294967295]"),
        ):
            if not ok:
                raise ConfigError(f"{flag}: must be {what}, got {value}")
        gen = GenerateConfig(
            model=args.model, adapter=args.adapter, prompts=args.prompts, num_samples=args.num_samples,
            judge=args.judge, judge_args=args.judge_arg, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
            seed=args.sample_seed, device=args.device,
        )
        generate(gen, _build_config(args, "generate", [args.prompts], command))
        return 0
    if args.command == "validate":
        from data_tools.validate import validate_command

        return validate_command(args.path, args.splits)
    if args.command == "stats":
        from data_tools.stats import stats_command

        stats_command(args.path, args.splits, args.tokenizer, args.near_dup, args.near_dup_threshold,
                      args.near_dup_ngram, args.output)
        return 0
    if args.command == "demo":
        from data_tools import demo_data

        return demo_data.main(["--output-dir", args.output_dir, "--seed", str(args.seed)])
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

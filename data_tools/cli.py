"""`align-data`: the preference dataset builder's command line.

Subcommands:
  demo   regenerate the bundled demo datasets (demo_sft, demo_prefs) of the default recipes
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align-data", description="Build preference datasets for align.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate the bundled demo datasets (demo_sft, demo_prefs)")
    demo.add_argument("--output-dir", required=True, help="where demo_sft/ and demo_prefs/ are written")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from data_tools import demo_data

        return demo_data.main(["--output-dir", args.output_dir, "--seed", str(args.seed)])
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

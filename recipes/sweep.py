#!/usr/bin/env python
"""Sweep a stage over values of its KL knob and learning rate (or any key), then optionally evaluate them all:

    python recipes/sweep.py --config recipes/configs/smollm2-135m/dpo.yaml \
        --values beta=0.05,0.1,0.3 --values lr=1e-4,3e-4 [--eval recipes/configs/smollm2-135m/eval.yaml] [key=value ...]

or from a sweep YAML: `python recipes/sweep.py --config recipes/configs/smollm2-135m/sweep-dpo.yaml`.
All logic lives in align.cli.sweep; `--keys` lists the keys of a sweep YAML.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from align.cli.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

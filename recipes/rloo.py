#!/usr/bin/env python
"""RLOO stage (REINFORCE leave-one-out, LoRA policy on one frozen base): `python recipes/rloo.py --config recipes/configs/smollm2-135m/rloo.yaml [key=value ...]`.

All logic lives in align.stages.rloo; `--keys` lists every config key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from align.cli.recipes import recipe_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(recipe_main("rloo"))

#!/usr/bin/env python
"""ORPO stage: `python recipes/orpo.py --config recipes/configs/smollm2-135m/orpo.yaml [key=value ...]`.

All logic lives in align.stages.orpo; `--keys` lists every config key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from align.cli.recipes import recipe_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(recipe_main("orpo"))

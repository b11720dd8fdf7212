#!/usr/bin/env python
"""KTO stage: `python recipes/kto.py --config recipes/configs/smollm2-135m/kto.yaml [key=value ...]`.

All logic lives in align.stages.kto; `--keys` lists every config key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from align.cli.recipes import recipe_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(recipe_main("kto"))

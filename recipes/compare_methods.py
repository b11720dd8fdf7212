#!/usr/bin/env python
"""Methods comparison: `python recipes/compare_methods.py --config recipes/configs/smollm2-135m/compare_methods.yaml`.

The same SFT (and DPO) run with each PEFT method; writes comparison.md in the output dir
and a W&B table. All logic lives in align.cli.compare; `--keys` lists every config key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from align.cli.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

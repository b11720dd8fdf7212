#!/usr/bin/env python
"""Run a pipeline (SFT -> DPO, ...): `python recipes/pipeline.py --config recipes/configs/smollm2-135m/pipeline.yaml`.

Stages whose finished RunDir matches their config and parent are skipped (`--force` reruns).
Override a stage's key with `<stage name>.<key>=value`, e.g. `sft.train.max_steps=5`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from align.cli.recipes import pipeline_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pipeline_main())

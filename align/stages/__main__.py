"""`python -m align.stages STAGE --config FILE [key=value ...]`: run one stage (what recipes/<stage>.py does).

The methods comparison runs each stage this way, in its own process.
"""

import sys

from align.cli.recipes import recipe_main
from align.stages.registry import all_stages

stages = all_stages()
if len(sys.argv) < 2 or sys.argv[1] not in stages:
    print(f"usage: python -m align.stages {{{','.join(stages)}}} --config FILE [key=value ...]", file=sys.stderr)
    sys.exit(2)
sys.exit(recipe_main(sys.argv[1], sys.argv[2:]))

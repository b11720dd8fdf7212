"""`python -m align ...`: the `align` command line (see align/cli/main.py)."""

import sys

from align.cli.main import main

sys.exit(main())

"""`python -m align ...`: the adapter lifecycle CLI (see align/cli/lifecycle.py)."""

import sys

from align.cli.lifecycle import main

sys.exit(main())

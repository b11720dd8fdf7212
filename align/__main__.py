"""`python -m align ...`: the adapter lifecycle CLI (see align/lifecycle.py)."""

import sys

from align.lifecycle import main

sys.exit(main())

"""``python -m cxr_triage`` is ``cxr-triage``."""

import sys

from cxr_triage.cli import main

sys.exit(main())

"""``python -m training COMMAND`` (see ``training.cli``)."""

import sys

from training import cli

cli.COUNT_PROCESS_STARTUP = True
sys.exit(cli.main())

"""``python -m vispruner``: the same as the ``vispruner`` command."""

import sys

from vispruner.cli import main

sys.exit(main())

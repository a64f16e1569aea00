"""``python -m bridges.guard``: see :mod:`bridges.guard`."""

import sys

from .app import main

sys.exit(main())

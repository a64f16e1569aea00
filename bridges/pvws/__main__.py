"""``python -m bridges.pvws``: see :mod:`bridges.pvws`."""

import sys

from .main import main

sys.exit(main())

"""``python -m bridges.flat``: run the CA bridge (see the package docstring)."""

from .app import main

raise SystemExit(main())

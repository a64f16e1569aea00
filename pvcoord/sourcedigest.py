"""Digest of pvcoord's installed sources, to tell whether the venv's copy matches a checkout.

``scripts/setup.sh`` installs pvcoord as a copy (not editable) so that every OS account can import
it, and stores this digest in the venv; the test suite compares it with the checkout's and refuses
to run against a stale copy. Standard library only: ``setup.sh`` runs it before pvcoord is
installed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGES = ("pvdb", "iocs", "bridges", "pvcoord")
"""The top-level packages ``pyproject.toml`` installs."""

STAMP = ".pvcoord-source"
"""File in the venv's top directory that holds the digest of the installed copy."""


def digest(root: str | Path) -> str:
    """SHA-1 hex digest over the path and content of every file of :data:`PACKAGES` under ``root``.

    ``__pycache__`` folders and ``.pyc`` files are left out; ``pyproject.toml`` is included (it
    decides what gets installed).
    """
    root = Path(root)
    h = hashlib.sha1()
    files = [root / "pyproject.toml"]
    for pkg in PACKAGES:
        files += [
            p for p in (root / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + hashlib.sha1(p.read_bytes()).digest())
    return h.hexdigest()

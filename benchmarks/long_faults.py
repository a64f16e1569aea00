"""The fault, fuzz and soak checks of tests/test_durability_system.py and the queue IOC's fuzz
(tests/test_queue_fuzz.py) at the issue's full scale.

Usage: ``.venv/bin/python benchmarks/long_faults.py [-k kill9|fuzz|soak|twenty]``

Runs the same tests (one definition of every check) with ``PVCOORD_FAULT_SCALE=long``: 20 OS
accounts x 100 operations, ``kill -9`` during 10,000 operations by 20 clients (IOC, and Redis then
IOC), 10,000 malformed requests plus 10,000 refused puts in 4 concurrent floods (coordination and
queue IOCs; 5,000 of each to the registry IOC), a 30-minute soak
with RSS and open descriptors sampled. The figures are printed by the tests; pytest's verdict is
the result. Takes about 40 minutes: do not run it while others need the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pvcoord.procs import PYTHON

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    env = {**os.environ, "PVCOORD_FAULT_SCALE": "long",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [PYTHON, "-m", "pytest", "-s", "-q", "--timeout", "7200",
            "tests/test_durability_system.py", "tests/test_queue_fuzz.py", *sys.argv[1:]]
    return subprocess.run(argv, cwd=REPO, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())

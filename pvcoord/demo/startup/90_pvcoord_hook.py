"""Demo profile collection, part 3: activate the pvcoord worker hook (docs/queue.md).

The one line that matters is the last one; ``PVCOORD_HOOK=off`` in the RE Manager's environment
leaves a profile unguarded on purpose (and says so on the console).
"""

import os

if os.environ.get("PVCOORD_HOOK", "on") == "off":
    print("pvcoord worker hook DISABLED (PVCOORD_HOOK=off): plans are not checked against locks")
else:
    from pvcoord.worker_hook import lock_guard; RE.preprocessors.append(lock_guard())  # noqa: E702, F821, I001

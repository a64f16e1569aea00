# Test profile collection for `pvcoord registry import` (loaded by bluesky-queueserver's
# profile_ops in a child process). PV names come from pvdb.demo; nothing here connects.
from bluesky import RunEngine

from pvdb import demo  # noqa: F401 - used by the later startup files

P = "IMPORT:"
RE = RunEngine({})  # starts the bluesky event loop that ophyd-async's init_devices() uses


def _suffix(spec):
    """':Setpoint' from '{device}:Setpoint': ophyd components append it to the device prefix."""
    return spec.suffix.format(device="")

"""Forwarded puts over Channel Access (libca, through pyepics) to device IOCs that serve CA.

A forwarded PVA put is two round trips to the device IOC (INIT, then the put) and wakes pvxs's
worker thread three times; a CA put-callback is one round trip (decision 0155). When the device
network's CA settings are given (``--upstream EPICS_CA_ADDR_LIST=...``), :class:`CaUpstream`
forwards a numeric or enum put as one ``ca_array_put_callback``; the put completes when libca
reports the upstream completion, with libca's status (``ECA_NORMAL``, or the failure:
``ECA_PUTFAIL``, ``ECA_DISCONN``...). pyepics's own put callback drops that status, so the put
is this module's call with its own callback; pyepics loads libca, makes the context and the
channels.

:meth:`CaUpstream.put` returns None when CA cannot take the put as given, and the bridge puts
over PVA as before: a string PV, a channel not (yet) connected, no CA write access, more
elements than the channel has, or a number the channel's native CA type cannot hold.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import numbers
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

_log = logging.getLogger(__name__)

CA_KEYS = ("EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_SERVER_PORT",
           "EPICS_CA_MAX_ARRAY_BYTES")
"""``--upstream`` keys for libca (the device network's CA search list and port)."""
ECA_NORMAL = 1
CS_CONN = 2  # ca_state(): connected
# native DBR types (db_access.h) and the integer ranges CA carries for them
DBR_STRING, DBR_SHORT, DBR_FLOAT, DBR_ENUM, DBR_CHAR, DBR_LONG, DBR_DOUBLE = range(7)
_INT_RANGE = {DBR_SHORT: (-(2**15), 2**15 - 1), DBR_ENUM: (0, 2**16 - 1), DBR_CHAR: (0, 255),
              DBR_LONG: (-(2**31), 2**31 - 1)}
PROBE_NAME = "pvcoord:flat:ca-probe"
"""A channel made and cleared at start (see :meth:`CaUpstream.open`)."""
_NUMERIC = frozenset({DBR_SHORT, DBR_FLOAT, DBR_ENUM, DBR_CHAR, DBR_LONG, DBR_DOUBLE})


class CaUpstream:
    """libca puts with completion, on channels opened on first use.

    Args:
        env: ``EPICS_CA_*`` settings of the device network (see :data:`CA_KEYS`); they are put
            into this process's environment only while libca makes its context.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = {k: v for k, v in env.items() if k in CA_KEYS}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._libca: Any = None
        self._dbr: Any = None
        self._chids: dict[str, Any] = {}
        self._checked: dict[str, bool] = {}
        self.own_port: int | None = None
        """The bridge's own CA port: a channel answered there is never used (no loop)."""
        self._pending: dict[int, tuple[asyncio.Future, Any]] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._callback: Any = None
        self.puts = 0
        """Puts sent over CA since start (for tests and the benchmark)."""

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load libca and make its context (preemptive callbacks) with :attr:`env`."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            from epics import ca, dbr

            self._libca = ca.initialize_libca()
            # libca builds its search list (address list, server port) when its UDP part is
            # made, at the first channel: make one while this environment is in place
            ca.clear_channel(ca.create_channel(PROBE_NAME, connect=False, auto_cb=False))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._dbr = dbr
        self._loop = loop
        self._callback = dbr.make_callback(self._completed, dbr.event_handler_args)
        _log.info("forwarded numeric and enum puts go over CA (%s) where the device IOC serves "
                  "them", " ".join(f"{k}={v}" for k, v in sorted(self.env.items())))

    def close(self) -> None:
        """Fail the puts still waiting (libca itself is finalized by pyepics at exit)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.cancel()

    def prepare(self, name: str) -> None:
        """Open the CA channel of ``name`` now (it connects in the background), if not open."""
        if self._libca is not None and name not in self._chids:
            from epics import ca

            self._chids[name] = ca.create_channel(name, connect=False, auto_cb=True)

    def forget(self, name: str) -> None:
        """Close the CA channel of ``name`` (a mirror the bridge gave up)."""
        chid = self._chids.pop(name, None)
        self._checked.pop(name, None)
        if chid is not None:
            from epics import ca

            ca.clear_channel(chid)

    def _channel(self, name: str) -> Any:
        """The connected, writable channel of ``name`` (None: not yet, or not writable)."""
        chid = self._chids.get(name)
        if chid is None:
            self.prepare(name)
            return None  # connecting: this put goes over PVA
        libca = self._libca
        if libca.ca_state(chid) != CS_CONN or not libca.ca_write_access(chid):
            return None
        usable = self._checked.get(name)
        if usable is None:
            from epics import ca

            port = ca.host_name(chid).rpartition(":")[2]
            usable = self.own_port is None or port != str(self.own_port)
            if not usable:
                _log.error("%s: the CA upstream is this bridge's own port %s; its puts go "
                           "over PVA (check the --upstream EPICS_CA_* settings)", name, port)
            self._checked[name] = usable
        return chid if usable else None

    def _data(self, chid: Any, values: Sequence[Any]) -> tuple[int, Any] | None:
        """``(native type, ctypes array)`` for ``values``, or None if CA cannot carry them."""
        libca = self._libca
        ftype = int(libca.ca_field_type(chid))
        count = len(values)
        if ftype not in _NUMERIC or count < 1 or count > int(libca.ca_element_count(chid)):
            return None
        data = (count * self._dbr.Map[ftype])()
        limits = _INT_RANGE.get(ftype)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                return None
            x = float(v)
            if limits is not None:
                if not x.is_integer() or not limits[0] <= x <= limits[1]:
                    return None
                data[i] = int(x)
            else:
                data[i] = x
        return ftype, data

    def put(self, name: str, values: Sequence[Any]) -> asyncio.Future | None:
        """Put ``values`` to ``name`` with completion; None if this put is not for CA.

        The future gets libca's completion status (:data:`ECA_NORMAL` when the upstream put
        completed) or libca's error status of the request itself.
        """
        if self._libca is None:
            return None
        chid = self._channel(name)
        if chid is None:
            return None
        data = self._data(chid, values)
        if data is None:
            return None
        ftype, arr = data
        loop = self._loop
        assert loop is not None
        fut = loop.create_future()
        with self._lock:
            self._seq += 1
            key = self._seq
            usr = ctypes.py_object(key)
            self._pending[key] = (fut, usr)
        ret = self._libca.ca_array_put_callback(ftype, len(arr), chid, arr, self._callback, usr)
        if ret != ECA_NORMAL:
            with self._lock:
                self._pending.pop(key, None)
            fut.set_result(int(ret))
            return fut
        self._libca.ca_flush_io()
        self.puts += 1
        return fut

    def _completed(self, args: Any) -> None:
        """The put-callback of libca (on a libca thread): hand the status to the loop."""
        with self._lock:
            item = self._pending.pop(args.usr, None)
        if item is None:
            return  # timed out or closed meanwhile
        fut, status = item[0], int(args.status)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_settle, fut, status)
        except RuntimeError:  # the loop closed meanwhile: nobody waits
            pass

    def message(self, status: int) -> str:
        """The text libca gives for ``status``."""
        from epics import ca

        return str(ca.message(status))


def _settle(fut: asyncio.Future, status: int) -> None:
    if not fut.done():
        fut.set_result(status)

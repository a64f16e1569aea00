"""caproto channel entries of the CA bridge: proxied device PVs, screen PVs, command PVs.

Every entry asks its :class:`Owner` (the bridge) for access rights and writes, so the lock
decision lives in one place. caproto calls ``check_access(host, user)`` when a channel is
created (and the bridge again after each lock change), ``auth_write`` for each client write.

* :class:`Proxy` classes mirror one upstream PVA channel (value, alarm, time stamp, units,
  precision, limits, enum labels); a client write is forwarded upstream by the owner and never
  stored locally (the upstream monitor brings the new value).
* screen entries are read-only for clients; the bridge updates them with ``write(...,
  verify_value=False)``.
* command entries hand each write to the owner, which validates it and acts.
"""

from __future__ import annotations

from typing import Any, Protocol

from caproto import (
    AccessRights,
    ChannelDouble,
    ChannelEnum,
    ChannelInteger,
    ChannelString,
)
from caproto._backend import backend
from caproto._dbr import native_type
from caproto._utils import ConversionDirection

READ_ONLY = AccessRights.READ
READ_WRITE = AccessRights.READ | AccessRights.WRITE


class Owner(Protocol):
    """What entries need of the bridge."""

    def device_access(self, entry: Proxy, host: str | None, user: str | None) -> AccessRights:
        """Access rights of ``user`` at ``host`` on a proxied device PV."""
        ...

    def command_access(self, host: str | None, user: str | None) -> AccessRights:
        """Access rights on a command PV."""
        ...

    async def forward(self, entry: Proxy, user: str | None, host: str | None,
                      values: list[Any]) -> None:
        """Decide and forward a client write upstream; raise to fail the put."""
        ...

    async def command(self, entry: Command, user: str | None, host: str | None,
                      values: list[Any], data_type: Any) -> None:
        """Run a command put; raise to fail the put."""
        ...


def wire_values(entry: Any, data: Any, data_type: Any) -> list[Any]:
    """A client write's elements as Python values in ``entry``'s own type (a list)."""
    out = backend.convert_values(
        values=data, from_dtype=native_type(data_type), to_dtype=entry.data_type,
        string_encoding=entry.string_encoding, enum_strings=getattr(entry, "enum_strings", None),
        direction=ConversionDirection.FROM_WIRE,
    )
    if isinstance(out, str | bytes):
        return [out]
    return list(out)


def raw_values(data: Any, data_type: Any) -> list[Any]:
    """A client write's elements without conversion (bytes for strings and char arrays)."""
    if isinstance(data, bytes | str):
        return [data]
    try:
        vals = list(data)
    except TypeError:
        return [data]
    if native_type(data_type).name == "CHAR":
        return [bytes(int(x) & 0xFF for x in vals)]
    return vals


class Proxy:
    """Mixin of a proxied device PV: gated by the owner, writes forwarded upstream."""

    owner: Owner
    pvname: str
    """The upstream (device IOC) name this entry mirrors; the decision is taken on it."""
    connected: bool = False

    def check_access(self, hostname, username):  # noqa: D102 - caproto API
        return self.owner.device_access(self, hostname, username)

    async def auth_write(self, hostname, username, data, data_type, metadata, *, flags=0,  # noqa: D102 - caproto API
                         user_address=None):
        values = wire_values(self, data, data_type)
        await self.owner.forward(self, username, hostname, values)


class ProxyDouble(Proxy, ChannelDouble):
    """A proxied floating-point PV."""


class ProxyInteger(Proxy, ChannelInteger):
    """A proxied integer PV."""


class ProxyString(Proxy, ChannelString):
    """A proxied string PV."""


class ProxyEnum(Proxy, ChannelEnum):
    """A proxied enum PV (labels from the upstream NTEnum)."""


class Screen:
    """Mixin of a read-only screen PV."""

    def check_access(self, hostname, username):  # noqa: D102 - caproto API
        return READ_ONLY


class ScreenDouble(Screen, ChannelDouble):
    """Read-only number (e.g. remaining lease)."""


class ScreenInteger(Screen, ChannelInteger):
    """Read-only integer."""


class ScreenString(Screen, ChannelString):
    """Read-only text (a long string with ``NAME$``)."""


class ScreenEnum(Screen, ChannelEnum):
    """Read-only enum (e.g. lock state)."""


class Command:
    """Mixin of a command PV: writes go to the owner, nothing is stored."""

    owner: Owner
    pvname: str
    device: str = ""
    """The device of a per-device command ('' for Flat:Take / Flat:Release)."""
    action: str = ""
    """``take`` or ``release``."""

    def check_access(self, hostname, username):  # noqa: D102 - caproto API
        return self.owner.command_access(hostname, username)

    async def auth_write(self, hostname, username, data, data_type, metadata, *, flags=0,  # noqa: D102 - caproto API
                         user_address=None):
        await self.owner.command(self, username, hostname, raw_values(data, data_type),
                                 data_type)


class CommandEnum(Command, ChannelEnum):
    """Per-device Take / Release."""


class CommandString(Command, ChannelString):
    """Flat:Take / Flat:Release (device names)."""

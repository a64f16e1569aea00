"""The bridge's configuration and PV-name parsing (pure; no network)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SCHEMES = ("pva", "ca", "loc", "sim")
"""Name schemes the bridge serves (``pva://``, ``ca://``, ``loc://``, ``sim://``)."""
SIM_CHANNELS = ("sine", "flipflop", "ramp", "noise")
"""``sim://`` channels: ``sine`` (amplitude 5, period 10 s, 10 Hz), ``flipflop(N)`` (enum
false/true toggling every N s, default 1), ``ramp`` (0..10 in 10 s, 10 Hz), ``noise`` (10 Hz)."""
MAX_NAME = 1024
"""Longest accepted PV name (characters, scheme included)."""
AUTH_MODES = ("none", "password", "header")

_NAME_RE = re.compile(r"^[\x21-\x7e][\x20-\x7e]*\Z")
_LOC_RE = re.compile(r"^([A-Za-z0-9_\-:.]+)(?:\((.*)\))?\Z", re.S)
_SIM_RE = re.compile(r"^([a-z]+)(?:\(([^()]*)\))?\Z")


class PVNameError(ValueError):
    """A PV name the bridge cannot serve; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PVName:
    """A parsed PV name.

    Attributes:
        scheme: ``pva``, ``ca``, ``loc`` or ``sim``.
        name: the channel name without scheme (``loc``/``sim``: without the ``(args)``).
        arg: the text inside ``( )`` for ``loc://x(init)`` / ``sim://flipflop(N)``, else None.
    """

    scheme: str
    name: str
    arg: str | None = None

    @property
    def key(self) -> str:
        """The pool key: names that reach the same channel share it (``X`` == ``pva://X``)."""
        return f"{self.scheme}://{self.name}" + (f"({self.arg})" if self.scheme == "sim"
                                                 and self.arg is not None else "")


def parse_name(text: object, default_scheme: str = "pva") -> PVName:
    """Parse a subscribed name (``pva://X``, ``ca://X``, ``loc://x(1)``, ``sim://sine``, ``X``).

    Raises:
        PVNameError: ``bad-name`` (not a string, empty, too long, control characters) or
            ``unknown-scheme`` (``dev://``, ``eq://``...), ``unknown-sim`` (unknown sim channel).
    """
    if not isinstance(text, str):
        raise PVNameError("bad-name", f"a PV name must be a string, not {type(text).__name__}")
    if len(text) > MAX_NAME:
        raise PVNameError("bad-name", f"PV name longer than {MAX_NAME} characters")
    if not _NAME_RE.match(text):
        raise PVNameError("bad-name", f"PV name {text[:60]!r} is empty or has control characters")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = default_scheme, text
    if scheme not in SCHEMES:
        raise PVNameError("unknown-scheme",
                         f"{text[:60]!r}: scheme {scheme[:20]!r} is not served; use "
                         + ", ".join(f"{s}://" for s in SCHEMES))
    if not rest:
        raise PVNameError("bad-name", f"{text[:60]!r} names no channel")
    if scheme == "loc":
        m = _LOC_RE.match(rest)
        if not m:
            raise PVNameError("bad-name", f"{text[:60]!r}: use loc://NAME or loc://NAME(initial)")
        return PVName("loc", m.group(1), m.group(2))
    if scheme == "sim":
        m = _SIM_RE.match(rest)
        if not m or m.group(1) not in SIM_CHANNELS:
            raise PVNameError("unknown-sim", f"{text[:60]!r}: sim channels are "
                             + ", ".join(SIM_CHANNELS))
        return PVName("sim", m.group(1), m.group(2))
    return PVName(scheme, rest)


@dataclass
class BridgeConfig:
    """Everything ``make_app`` needs.

    Attributes:
        prefix: endstation prefix ``P`` (with its trailing colon) of the coordination IOC.
        registry_prefix: prefix of the registry IOC ('' = ``prefix``).
        host: HTTP bind address (127.0.0.1 unless a reverse proxy on another host needs it).
        port: HTTP port.
        throttle: per-socket, per-PV coalescing period in seconds (the last state is always
            sent; 0 sends every update).
        default_scheme: scheme of names without one (``pva``; PVWS uses ``ca``).
        writes: write support (``write`` messages, ``/api/lock``); off by default.
        auth: ``none`` (nobody is logged in: reads only), ``password`` (``POST /login`` against
            ``password_file``) or ``header`` (user name in ``user_header``, set by a reverse proxy
            at one of ``trusted_proxies``).
        password_file: ``user:argon2-hash`` lines (``python -m bridges.pvws passwd``).
        user_header: request header carrying the proxy-authenticated user name.
        trusted_proxies: peer addresses whose ``user_header`` is believed.
        secure_cookies: mark the session cookie ``Secure`` (on behind https).
        session_hours: session lifetime.
        admins: web users allowed to close other sockets (``DELETE /pvws/socket/{id}``).
        policy: policy TOML (the may-write decision's input; default built-in policy).
        client_conf: p4p client config (``EPICS_PVA_*``) for reads and pvcoord's services;
            None: this process's environment.
        device_conf: p4p client config for writes to device IOCs (the device network, as the
            guard reaches it); None: same as ``client_conf``.
        device_ca_conf: ``EPICS_CA_*`` of the device network: writes to ``ca://`` names go over
            Channel Access there (:mod:`bridges.pvws.cawrite`, a child process); None: they go
            over PVA (``device_conf``) under the same record name (decision 0136).
        max_pvs: most PVs one socket may subscribe.
        max_channels: most distinct channels the bridge holds open for all sockets together.
        max_sockets: most websockets open at once (more are refused with HTTP 503).
        queue_size: bounded per-socket queue of non-update messages (updates are coalesced per
            PV, so they never exceed one pending message per subscribed PV).
        max_message: largest accepted websocket frame in bytes (larger: the socket is closed with
            1009, as the websocket protocol says).
        static_dir: the web client's files (served at ``/``).
        put_timeout: seconds a device write may take.
        ca_via: how ``ca://`` names are read: ``ca`` (Channel Access, caproto's asyncio client,
            environment ``EPICS_CA_*``) or ``pva`` (PVA under the same name).
        status_pvs: serve ``P Web:Heartbeat``, ``Web:Version``, ``Web:StartTime`` over PVA
            (``pvcoord status``; the process entry turns it on).
        status_conf: p4p server configuration of those PVs (``EPICS_PVAS_*``); None: this
            process's environment.
    """

    prefix: str
    registry_prefix: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    throttle: float = 0.02
    default_scheme: str = "pva"
    writes: bool = False
    auth: str = "none"
    password_file: Path | None = None
    user_header: str = "X-Remote-User"
    trusted_proxies: tuple[str, ...] = ("127.0.0.1",)
    secure_cookies: bool = False
    session_hours: float = 12.0
    admins: tuple[str, ...] = ()
    policy: Path | None = None
    client_conf: dict[str, str] | None = None
    device_conf: dict[str, str] | None = None
    device_ca_conf: dict[str, str] | None = None
    max_pvs: int = 5000
    max_channels: int = 20000
    max_sockets: int = 1000
    queue_size: int = 2048
    max_message: int = 4 * 1024 * 1024
    static_dir: Path = field(default_factory=lambda: Path(__file__).parent / "static")
    put_timeout: float = 5.0
    ca_via: str = "ca"
    status_pvs: bool = False
    status_conf: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, not {self.auth!r}")
        if self.default_scheme not in ("pva", "ca"):
            raise ValueError(f"default scheme must be pva or ca, not {self.default_scheme!r}")
        if self.ca_via not in ("ca", "pva"):
            raise ValueError(f"ca:// names are read via ca or pva, not {self.ca_via!r}")
        bad = [k for k in self.device_ca_conf or {} if not k.startswith("EPICS_CA_")]
        if bad:
            raise ValueError(f"device CA configuration takes EPICS_CA_* keys only, not {bad}")
        if self.auth == "password" and self.password_file is None:
            raise ValueError("auth 'password' needs a password file (--password-file)")
        if not (0 <= self.throttle <= 10):
            raise ValueError(f"throttle {self.throttle} s is outside 0..10 s")
        self.registry_prefix = self.registry_prefix or self.prefix

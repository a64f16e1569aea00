"""When did each PVA monitor update reach each subscriber's socket: kernel receive timestamps.

Used by ``bench_coordination.py`` to time a server's fan-out independently of when the
subscriber processes (which share the machine's cores) get to run: a packet socket (Linux
``AF_PACKET``, needs ``CAP_NET_RAW``), filtered in the kernel to TCP segments from one server
port and kept only for the loopback interface's receive side, stamps each segment as the kernel
delivers it towards the receiving socket (``SO_TIMESTAMPNS``, ``CLOCK_REALTIME``), however late
this process reads it. (Bound to ``lo`` the socket saw nothing on the project VM; unbound it
sees every interface, so the interface is checked here.) Each
segment's PVA messages are parsed; the MONITOR data updates (command 13, not the INIT reply) are
kept per subscriber connection (its TCP port).

Usage::

    with WireCapture(server_port) as cap:
        ...  # make the changes
    updates = cap.updates()  # {subscriber port: [receive time in s (epoch), ...]}
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading

ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
PVA_MONITOR = 13


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _tcp_src_port_filter(port: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF on an IPv4 packet (no link header): accept TCP segments from ``port``."""
    return [
        (0x30, 0, 0, 9),  # ldb [9]: IP protocol
        (0x15, 0, 4, 6),  # jeq #6 (TCP), else drop
        (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf): IP header length
        (0x48, 0, 0, 0),  # ldh [x+0]: TCP source port
        (0x15, 0, 1, port),  # jeq #port, else drop
        (0x06, 0, 0, 0x40000),  # ret: keep the packet
        (0x06, 0, 0, 0),  # ret 0: drop
    ]


def pva_monitor_updates(segment: bytes) -> int:
    """Number of PVA MONITOR data updates (not INIT replies) that start in a TCP payload."""
    n, off = 0, 0
    while off + 8 <= len(segment):
        if segment[off] != 0xCA:
            break  # the rest of a message begun in an earlier segment
        flags, cmd = segment[off + 2], segment[off + 3]
        size = int.from_bytes(segment[off + 4:off + 8], "big" if flags & 0x80 else "little")
        if flags & 0x01 == 0 and cmd == PVA_MONITOR and off + 13 <= len(segment):
            if segment[off + 12] & 0x08 == 0:  # subcommand: 0x08 is the INIT reply
                n += 1
        off += 8 + (0 if flags & 0x01 else size)
    return n


class WireCapture:
    """Kernel receive timestamps of the PVA monitor updates a server sends on loopback.

    Args:
        server_port: the server's PVA TCP port (segments *from* it are captured).
        interface: the interface to capture on.

    Raises:
        PermissionError: without ``CAP_NET_RAW`` (run as root, or skip ``--wire``).
    """

    def __init__(self, server_port: int, interface: str = "lo") -> None:
        self.port = server_port
        self.interface = interface
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        prog = _tcp_src_port_filter(server_port)
        insns = (_SockFilter * len(prog))(*(_SockFilter(*i) for i in prog))
        fprog = _SockFprog(len(prog), insns)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
        self._sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._by_port: dict[int, list[float]] = {}
        self.drops = 0
        self._thread = threading.Thread(target=self._run, name="wire-capture", daemon=True)

    def __enter__(self) -> WireCapture:
        self._stats()  # reading the statistics resets them
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.drops = self._stats()[1]
        self._sock.close()

    def _stats(self) -> tuple[int, int]:
        """(packets, drops) since the last call."""
        return struct.unpack("II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, addr = self._sock.recvmsg(65536, 64)
            except TimeoutError:
                continue
            if addr[0] != self.interface or addr[2] == socket.PACKET_OUTGOING:
                continue
            stamp = None
            for level, kind, val in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", val[:16])
                    stamp = sec + nsec * 1e-9
            ihl = (data[0] & 0x0F) * 4
            dst = int.from_bytes(data[ihl + 2:ihl + 4], "big")
            payload = data[ihl + (data[ihl + 12] >> 4) * 4:]
            n = pva_monitor_updates(payload)
            if n and stamp is not None:
                self._by_port.setdefault(dst, []).extend([stamp] * n)

    def updates(self) -> dict[int, list[float]]:
        """{subscriber TCP port: receive times (s since the epoch) of its monitor updates}."""
        return self._by_port

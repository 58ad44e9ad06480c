"""When a sync attempt's bytes really crossed the wire: the kernel's clock, not the thread's.

A thread reads the provider's answer only once it holds the GIL. Sixteen threads calling a 60 ms
provider on 2 cores wait 40-100 ms for it *after* the answer has arrived, so "when the thread
read the answer" blames the provider for the client's queue. The kernel knows better: Linux
keeps, per TCP socket, when data was last sent and last received (``struct tcp_info``'s
``tcpi_last_data_sent`` / ``tcpi_last_data_recv``, milliseconds ago, at the kernel's tick:
1-4 ms), and how many received bytes no one has read yet (``FIONREAD``). Reading them is one
``getsockopt`` / ``ioctl`` each, without the GIL's cooperation of the thread that owns the socket.

Everything here returns ``None`` where the OS does not say (not Linux, not TCP, a closed
socket): the driver then keeps the thread's own readings.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
from collections.abc import Iterable

_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if hasattr(socket, "IPPROTO_TCP") else None
_TCP_INFO_LEN = 104  # enough for every field up to tcpi_last_ack_recv on any Linux since 2.6
_LAST_DATA_SENT = 44  # offsets in struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32s
_LAST_DATA_RECV = 52

try:
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # not POSIX
    _FIONREAD = None


def _ms_since(sock: socket.socket, offset: int) -> float | None:
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError):  # closed, or not a TCP socket (a Unix socket proxy)
        return None
    if len(info) < offset + 4:
        return None
    return float(struct.unpack_from("=I", info, offset)[0])


def _unread(sock: socket.socket) -> int:
    if _FIONREAD is None:
        return 0
    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), _FIONREAD, buf)
    except (OSError, ValueError):
        return 0
    return int.from_bytes(buf, sys.byteorder)


def last_sent_at(sockets: Iterable[socket.socket], now: float) -> float | None:
    """When (on ``now``'s clock) the kernel last sent data on any of ``sockets``."""
    return _latest(sockets, now, _LAST_DATA_SENT)


def last_received_at(sockets: Iterable[socket.socket], now: float) -> float | None:
    """When (on ``now``'s clock) the kernel last received data on any of ``sockets``."""
    return _latest(sockets, now, _LAST_DATA_RECV)


def waiting_since(sockets: Iterable[socket.socket], now: float) -> float | None:
    """When the data that now sits unread on one of ``sockets`` arrived (``None``: nothing unread).

    Data waiting in the kernel is an answer the provider gave and the client has not read yet:
    from its arrival on, the wait is the client's. (It is the arrival of the *latest* bytes, so a
    provider still trickling its body keeps moving it forward.)
    """
    latest: float | None = None
    for sock in sockets:
        with contextlib.suppress(OSError, ValueError):
            if sock.fileno() == -1 or _unread(sock) <= 0:
                continue
            ms = _ms_since(sock, _LAST_DATA_RECV)
            if ms is not None:
                at = now - ms / 1000.0
                latest = at if latest is None else max(latest, at)
    return latest


def _latest(sockets: Iterable[socket.socket], now: float, offset: int) -> float | None:
    latest: float | None = None
    for sock in sockets:
        if sock.fileno() == -1:
            continue
        ms = _ms_since(sock, offset)
        if ms is not None:
            at = now - ms / 1000.0
            latest = at if latest is None else max(latest, at)
    return latest

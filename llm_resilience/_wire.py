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
_TCP_INFO_LEN = 136  # up to tcpi_bytes_received (Linux 4.1); older kernels return less, read as "unknown"
_LAST_DATA_SENT = 44  # offsets in struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32s
_LAST_DATA_RECV = 52  # (set at the handshake's end too: tcp_finish_connect)
_RTT_US = 68
_TOTAL_RETRANS = 100
_BYTES_RECEIVED = 128  # u64
_TCP_SYN_SENT = 2  # tcpi_state (the first byte): the SYN is out, no answer yet

try:
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # not POSIX
    _FIONREAD = None


def _tcp_info(sock: socket.socket) -> bytes | None:
    if _TCP_INFO is None:
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError):  # closed, or not a TCP socket (a Unix socket proxy)
        return None


def _u32(info: bytes | None, offset: int) -> int | None:
    if info is None or len(info) < offset + 4:
        return None
    return int(struct.unpack_from("=I", info, offset)[0])


_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def _ms_since(sock: socket.socket, offset: int) -> float | None:
    # _tcp_info and _u32 in one: this runs on every sync attempt (when its answer came), where
    # three Python calls cost more than the system call.
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError):  # closed, or not a TCP socket (a Unix socket proxy)
        return None
    if len(info) < offset + 4:
        return None
    return float(_U32.unpack_from(info, offset)[0])


def received_bytes(sock: socket.socket) -> int | None:
    """How many bytes the kernel has received on ``sock`` so far (``None``: the OS does not say)."""
    info = _tcp_info(sock)
    if info is None or len(info) < _BYTES_RECEIVED + 8:
        return None
    return int(_U64.unpack_from(info, _BYTES_RECEIVED)[0])


def read_begins(sock: socket.socket, now: float) -> tuple[float | None, int | None]:
    """What a read on ``sock`` that begins ``now`` needs, from one ``TCP_INFO``: when (on ``now``'s
    clock) the kernel last sent data on it (the request's last byte, once a request was written),
    and how many of the bytes received so far reads have taken (received, less what sits unread).
    Each ``None`` where the OS does not say. This runs on every sync attempt: one system call for both."""
    info = _tcp_info(sock)
    if info is None:
        return None, None
    size = len(info)
    left = now - _U32.unpack_from(info, _LAST_DATA_SENT)[0] / 1000.0 if size >= _LAST_DATA_SENT + 4 else None
    taken = _U64.unpack_from(info, _BYTES_RECEIVED)[0] - _unread(sock) if size >= _BYTES_RECEIVED + 8 else None
    return left, taken


def established(sock: socket.socket) -> bool | None:
    """Whether ``sock``'s TCP handshake has completed (``None``: the OS does not say)."""
    info = _tcp_info(sock)
    if not info:
        return None
    return info[0] != _TCP_SYN_SENT


def handshake_s(sock: socket.socket, since: float, now: float) -> float | None:
    """How much of a connect that began at ``since`` and returned by ``now`` was the network's.

    The kernel marks when the handshake completed; before it, the thread may have waited for the
    GIL to even send its SYN (a thread burst: tens of ms). Without a retransmission, the handshake
    took one round trip, which the kernel measured (``tcpi_rtt``, microseconds): that is the
    network's share, never more than the span from ``since`` to completion. ``None``: the OS does
    not say.
    """
    info = _tcp_info(sock)
    ago_ms = _u32(info, _LAST_DATA_RECV)
    if ago_ms is None:
        return None
    done = min(now, max(since, now - ago_ms / 1000.0))
    span = done - since
    rtt_us, retrans = _u32(info, _RTT_US), _u32(info, _TOTAL_RETRANS)
    if rtt_us is None or retrans is None or retrans > 0 or rtt_us == 0:
        return span  # a lost SYN costs the provider's side a full retransmission timeout
    return min(span, rtt_us / 1e6)


def _unread(sock: socket.socket) -> int:
    if _FIONREAD is None:
        return 0
    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), _FIONREAD, buf)
    except (OSError, ValueError):
        return 0
    return int.from_bytes(buf, sys.byteorder)


def received_at(sock: socket.socket, now: float) -> float | None:
    """When (on ``now``'s clock) the kernel last received data on ``sock``."""
    ms = _ms_since(sock, _LAST_DATA_RECV)
    return None if ms is None else now - ms / 1000.0


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

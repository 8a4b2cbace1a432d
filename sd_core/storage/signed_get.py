"""Ranged GETs of presigned URLs: plain-http bodies spliced socket → cache file in the kernel, TLS into one buffer."""

# Why: obstore's stream hands every chunk to Python as a new `bytes` (zero-filled, then copied into), the largest
# user-space cost of a fetch. Here obstore only signs the request (its credentials, its addressing) and the body of
# each part is read here. Over plain http (a store in the same network, the loopback benchmarks) it never enters
# Python: splice() moves it socket → pipe → cache file inside the kernel, one copy fewer than recv + pwrite and no GIL
# round trip per chunk (side by side, imports alongside: 1.16x the MB/s at 0.71x the CPU of reading it through one
# buffer); the transfer hashes it from the mapped file. TLS bodies cannot be spliced (no kTLS): they are read record
# by record into one buffer, which the sink writes (pwrite) and hashes before the next read. BENCHMARKS.md, fetch.
# The URL carries a signature in its query: it is never logged nor put in an error (only type names and statuses).

from __future__ import annotations

import errno
import fcntl
import functools
import http.client
import os
import select
import ssl
from datetime import timedelta
from urllib.parse import urlsplit

from .objects import Transient

READ_BUFFER = 256 * 1024  # handed to the sink when full: large enough that Python's per-chunk work is small
SIGN_FOR = timedelta(minutes=15)  # a part's request is sent at once: the URL only has to live until then
FINAL = {301, 302, 307, 308, 400, 401, 403, 404, 405, 412, 416}  # answers a retry does not change
SPLICE = hasattr(os, "splice")  # Linux, Python >= 3.10; off after a filesystem refuses it (then: readinto)
PIPE_BYTES = 1 << 20  # the splice pipe's size when the system allows it (else its default, 64 KiB)
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class Final(Exception):
    """The store's final answer to a ranged GET (missing, denied, changed...): the caller explains it (S3: with
    boto3). `status` is the HTTP status, 0 when there was none."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def usable(environ=None) -> bool:
    """Presigned reads go straight to the endpoint: not where the environment names a proxy (obstore's client,
    which honours it, reads then)."""
    env = os.environ if environ is None else environ
    return not any(env.get(name) for name in _PROXY_VARS)


def read_signed(url: str, start: int, end: int | None, etag: str | None, sink, timeout_s: float,
                ca_bundle: str | None = None) -> None:
    """Stream bytes [start, end] (end None: all) of the presigned GET `url` into sink(memoryview); the view is only
    valid during the call. A sink with `target()` (the file and offset its next bytes go to) and `landed(n)` (n
    bytes were put there) gets a plain-http body spliced into its file instead. Raises Transient (retry the part) or
    Final (explain the answer)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=min(10.0, timeout_s),
                                           context=tls_context(ca_bundle))
    elif parts.scheme == "http":
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=min(10.0, timeout_s))
    else:
        raise Final("not an http(s) URL")
    headers = {"User-Agent": "sd-serverless"}
    if end is not None:
        headers["Range"] = f"bytes={start}-{end}"
    if etag:
        headers["If-Match"] = etag
    try:
        try:
            conn.connect()
            conn.sock.settimeout(timeout_s)  # connect bounded by min(10 s, timeout); each read by the timeout
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise Transient(type(exc).__name__) from None  # (never the URL: its query is a signature)
        if response.status in FINAL:
            raise Final(f"HTTP {response.status}", response.status)
        if response.status != (200 if end is None else 206):  # (a 200 to a ranged GET would write past the part)
            raise Transient(f"HTTP {response.status}")
        if conn.sock is not None and response.length and not response.chunked:
            left = response.length - _drain_head(response, sink)
            if SPLICE and parts.scheme == "http" and hasattr(sink, "landed"):
                return _splice_body(conn.sock, left, sink, timeout_s)
            return _receive(conn.sock, left, sink)
        buffer = memoryview(bytearray(READ_BUFFER))
        while True:
            try:
                n = response.readinto(buffer)
            except (OSError, http.client.HTTPException) as exc:
                raise Transient(f"{type(exc).__name__} while streaming") from None
            if not n:
                return
            sink(buffer[:n])  # (outside the try: a failed write into the cache is the transfer's to report)
    finally:
        conn.close()


def _drain_head(response, sink) -> int:
    """Hand sink() the body bytes http.client read along with the headers (the rest is read from the socket
    directly); returns their count."""
    try:
        head = response.fp.read1(min(len(response.fp.peek()), response.length))  # (the buffered bytes, else one read)
    except (OSError, http.client.HTTPException) as exc:
        raise Transient(f"{type(exc).__name__} while streaming") from None
    if head:
        sink(memoryview(head))
    return len(head)


def _splice_body(sock, left: int, sink, timeout_s: float) -> None:
    """Move the rest of a body (`left` bytes) into the sink's file through a pipe, telling sink.landed(n) as bytes
    reach it."""
    global SPLICE
    read_end, write_end = os.pipe()
    try:
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # (over the user's pipe limits: the default size works, in smaller moves)
            pass
        room = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while left:
            try:  # (the socket is non-blocking: it has a timeout; poll waits for it)
                n = os.splice(sock.fileno(), write_end, min(left, room), flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if not poller.poll(int(timeout_s * 1000)):
                    raise Transient("TimeoutError while streaming") from None
                continue
            except OSError as exc:
                raise Transient(f"{type(exc).__name__} while streaming") from None
            if not n:
                raise Transient("the connection closed while streaming")
            fd, offset = sink.target()
            moved = 0
            try:
                while moved < n:  # (a failed write into the cache is the transfer's to report: OSError as is)
                    moved += os.splice(read_end, fd, n - moved, offset_dst=offset + moved)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                SPLICE = False  # this filesystem takes no splice: what is in the pipe and the rest go through memory
                if moved:
                    sink.landed(moved)
                sink(memoryview(_read_exactly(read_end, n - moved)))
                return _receive(sock, left - n, sink)
            sink.landed(n)
            left -= n
    finally:
        os.close(read_end)
        os.close(write_end)


def _read_exactly(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunks.append(os.read(fd, n))
        n -= len(chunks[-1])
    return b"".join(chunks)


def _receive(sock, left: int, sink) -> None:
    """The rest of a body (`left` bytes) read from the socket into one buffer, handed to sink() each time it is full.
    A TLS socket is read through its SSL object: one record (<= 16 KiB) per call without the three Python frames of
    SocketIO / SSLSocket around it (measured: less CPU per GiB over https)."""
    buffer = memoryview(bytearray(READ_BUFFER))
    tls = getattr(sock, "_sslobj", None)  # (CPython's SSLSocket; its read() waits out the socket's timeout)
    read = tls.read if tls is not None else (lambda n, view: sock.recv_into(view, n))
    while left:
        want, filled = min(left, READ_BUFFER), 0
        while filled < want:
            try:
                n = read(want - filled, buffer[filled:want])
            except OSError as exc:
                raise Transient(f"{type(exc).__name__} while streaming") from None
            if not n:
                raise Transient("the connection closed while streaming")
            filled += n
        sink(buffer[:filled])  # (outside the try: a failed write into the cache is the transfer's to report)
        left -= filled


@functools.cache
def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The verifying TLS context of every part's connection (built once: loading the roots costs milliseconds); a
    private bundle is added to the system roots, as for obstore."""
    context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
    if ca_bundle:
        context.load_default_certs()
    return context


def sign(store, key: str) -> str:
    """A presigned GET URL for `key` in obstore's `store` (its credentials and addressing)."""
    import obstore

    return obstore.sign(store, "GET", key, SIGN_FOR)

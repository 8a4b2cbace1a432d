#!/usr/bin/env python3
"""A fault-injecting HTTP proxy for tests: sits in front of a local S3 server (loopback only) and breaks responses.

Faults, chosen per request from a schedule (consumed in order) and then at random with a probability (a draw that
depends only on the seed, the request — method, path without its query or first segment (an S3 bucket: tests name
theirs at random), Range — and how often that same request came before, so a seed gives the same faults in every run
whatever order parallel clients' requests arrive in):

    error500  answer 500 InternalError without asking the upstream
    error503  answer 503 SlowDown without asking the upstream
    drop      close the connection without any answer
    reset     forward, send the headers and part of the body, then reset the connection (TCP RST)
    stall     forward, send the headers and part of the body, then go silent for ``stall_s`` seconds and close
    truncate  forward, send the headers (full Content-Length) and part of the body, then close cleanly
    flip      forward the whole body with one byte inverted (same length: only a checksum can tell)
    ok        forward unchanged

``down=True`` answers every request with 503 (the store stays down). Only requests whose method is in ``methods``
(GET by default) and whose path matches ``path_pattern`` are faulted; body faults only apply to responses that have a
body. The Host header is forwarded unchanged, so SigV4 signatures made for the proxy's address stay valid.

From Python::

    with FaultProxy("http://127.0.0.1:8333", schedule=["error503", "reset"], probability=0.2) as proxy:
        ...  # point the client at proxy.url
        print(proxy.counters)   # {'requests': 12, 'injected': 4, 'error503': 1, 'reset': 2, 'flip': 1, ...}

From the command line::

    python -m devtools.fault_proxy --upstream http://127.0.0.1:8333 --port 9333 --probability 0.3 \\
        --faults error503,reset,flip --seed 1
"""

from __future__ import annotations

import argparse
import http.client
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("error500", "error503", "drop", "reset", "stall", "truncate", "flip")
BODY_FAULTS = ("reset", "stall", "truncate", "flip")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade"}
LOOPBACK = ("127.0.0.1", "::1", "localhost")
CHUNK = 1 << 16

_ERROR_BODIES = {
    500: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
         b"<Message>injected by fault_proxy</Message></Error>",
    503: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
         b"<Message>injected by fault_proxy</Message></Error>",
}


class FaultProxy:
    """A threaded fault-injecting reverse proxy on 127.0.0.1; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(
        self, upstream: str, *, port: int = 0, schedule: list[str] | tuple[str, ...] = (), probability: float = 0.0,
        faults: tuple[str, ...] = FAULTS, seed: int = 0, methods: tuple[str, ...] = ("GET",),
        path_pattern: str | None = None, stall_s: float = 30.0, cut_fraction: float = 0.5, down: bool = False,
    ):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK:
            raise ValueError(f"upstream must be http:// on loopback, got {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.port = port
        self.stall_s = stall_s
        self.cut_fraction = cut_fraction
        self.counters: Counter[str] = Counter()
        self.log: list[tuple[str, str, str | None, str]] = []  # (method, path, Range header, fault) per request
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.configure(schedule=schedule, probability=probability, faults=faults, seed=seed, methods=methods,
                       path_pattern=path_pattern, down=down)

    # --- control ------------------------------------------------------------------------------------------------
    def configure(self, *, schedule=None, probability=None, faults=None, seed=None, methods=None,
                  path_pattern: str | None | type[Ellipsis] = ..., down=None) -> FaultProxy:
        """Change the fault plan while running (thread-safe); arguments left out keep their value."""
        with self._lock:
            if schedule is not None:
                unknown = [f for f in schedule if f not in FAULTS + ("ok",)]
                if unknown:
                    raise ValueError(f"unknown faults {unknown}; known: {FAULTS + ('ok',)}")
                self._schedule = list(schedule)
            if probability is not None:
                self.probability = probability
            if faults is not None:
                unknown = [f for f in faults if f not in FAULTS]
                if unknown:
                    raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
                self.faults = tuple(faults)
            if seed is not None:
                self._seed = seed
                self._seen: Counter[str] = Counter()  # per request: how often it came (a retry draws again)
            if methods is not None:
                self.methods = tuple(m.upper() for m in methods)
            if path_pattern is not ...:
                self.path_pattern = re.compile(path_pattern) if path_pattern else None
            if down is not None:
                self.down = down
        return self

    def reset_counters(self) -> None:
        with self._lock:
            self.counters.clear()
            self.log.clear()

    @property
    def injected(self) -> int:
        return self.counters["injected"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- decisions ----------------------------------------------------------------------------------------------
    def _choose(self, method: str, path: str, byte_range: str | None = None) -> str:
        with self._lock:
            self.counters["requests"] += 1
            if self.down:
                fault = "down"
            elif method not in self.methods or (self.path_pattern and not self.path_pattern.search(path)):
                fault = "ok"
            elif self._schedule:
                fault = self._schedule.pop(0)
            elif self.probability:
                where = re.sub(r"^/[^/]*", "/*", urlsplit(path).path)
                key = f"{self._seed}|{method}|{where}|{byte_range}"
                draw = random.Random(f"{key}|{self._seen[key]}")  # (str seeds are hashed with sha512: stable)
                self._seen[key] += 1
                fault = draw.choice(self.faults) if draw.random() < self.probability else "ok"
            else:
                fault = "ok"
            self.log.append((method, path, byte_range, fault))
            return fault

    def _count(self, fault: str) -> None:
        with self._lock:
            self.counters[fault] += 1
            self.counters["injected"] += 1


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _handle(self) -> None:
        owner = self.owner
        body = self._read_request_body()
        fault = owner._choose(self.command, self.path, self.headers.get("Range"))
        if fault in ("down", "error500", "error503"):
            status = 500 if fault == "error500" else 503
            owner._count(fault)
            self._send_error(status)
            return
        if fault == "drop":
            owner._count(fault)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            upstream = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
        except OSError:
            self._send_error(502)
            return
        try:
            self._relay(response, fault)
        finally:
            upstream.close()

    def _read_request_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _send_error(self, status: int) -> None:
        payload = _ERROR_BODIES.get(status, b"<Error><Code>BadGateway</Code></Error>")
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.close_connection = True

    def _relay(self, response: http.client.HTTPResponse, fault: str) -> None:
        owner = self.owner
        length_header = response.getheader("Content-Length")
        has_body = self.command != "HEAD" and response.status not in (204, 304)
        if has_body and length_header is None:  # chunked upstream answer: buffer it and send a length
            data = response.read()
            length = len(data)
        else:
            data = None
            length = int(length_header or 0)
        if not has_body or length == 0:
            fault = "ok"
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        if has_body or length_header is not None:
            self.send_header("Content-Length", str(length))
        if fault != "ok":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not has_body:
            return
        chunks = _chunks(response, data)
        cut = max(1, int(length * owner.cut_fraction)) if fault in ("reset", "stall", "truncate") else None
        flip_at = length // 2 if fault == "flip" else None
        sent = 0
        for chunk in chunks:
            if cut is not None and sent + len(chunk) >= cut:
                self.wfile.write(chunk[: cut - sent])
                self.wfile.flush()
                owner._count(fault)
                self._break(fault)
                return
            if flip_at is not None and sent <= flip_at < sent + len(chunk):
                index = flip_at - sent
                chunk = chunk[:index] + bytes([chunk[index] ^ 0xFF]) + chunk[index + 1:]
                owner._count(fault)
            self.wfile.write(chunk)
            sent += len(chunk)
        self.wfile.flush()

    def _break(self, fault: str) -> None:
        self.close_connection = True
        if fault == "stall":
            self.owner._stopping.wait(self.owner.stall_s)
        elif fault == "reset":
            # SO_LINGER with a zero timeout turns close() into a TCP RST.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


def _chunks(response: http.client.HTTPResponse, data: bytes | None):
    if data is not None:
        for start in range(0, len(data), CHUNK):
            yield data[start:start + CHUNK]
        return
    while True:
        chunk = response.read(CHUNK)
        if not chunk:
            return
        yield chunk


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT to put faults in front of")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (127.0.0.1; 0 = a free one)")
    parser.add_argument("--schedule", default="", help="comma list of faults for the first matching requests")
    parser.add_argument("--probability", type=float, default=0.0, help="chance of a random fault afterwards")
    parser.add_argument("--faults", default=",".join(FAULTS), help="faults the random choice picks from")
    parser.add_argument("--methods", default="GET", help="comma list of methods that may be faulted")
    parser.add_argument("--path-pattern", default=None, help="regex: only matching paths are faulted")
    parser.add_argument("--stall-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--down", action="store_true", help="answer everything with 503")
    args = parser.parse_args(argv)
    split = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
    proxy = FaultProxy(
        args.upstream, port=args.port, schedule=split(args.schedule), probability=args.probability,
        faults=split(args.faults), seed=args.seed, methods=split(args.methods), path_pattern=args.path_pattern,
        stall_s=args.stall_s, down=args.down,
    ).start()
    print(f"fault proxy on {proxy.url} -> {args.upstream}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly (and print the counters) on TERM too
    try:
        while True:
            time.sleep(10)
            print(dict(proxy.counters), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        print(dict(proxy.counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small fault-injecting reverse HTTP proxy for S3 tests (loopback only).

    proxy = FaultProxy("http://127.0.0.1:5000")      # in front of the moto server
    proxy.add_fault(method="GET", path_contains="key.png", status=503, code="SlowDown", times=2)
    proxy.add_fault(path_contains="k.png", status=404, code="NoSuchKey", message="503 SlowDown")
    proxy.add_fault(path_contains="x.bin", reset=True, times=1)  # close without a response
    proxy.add_fault(path_contains="x.bin", truncate=True)  # headers, half the body, reset
    ... point the client at proxy.url ...
    proxy.count("GET", "key.png")                    # attempts the proxy saw
    proxy.stop()

Every request is forwarded as is (method, path, query, headers including Host, body),
so a client that signs for the proxy's host:port is forwarded unchanged (moto does not
verify SigV4 signatures). A matching rule answers instead of the upstream, with a
proper S3 XML error body, ``times`` times (None: always); rules are tried in order.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "InternalError": "We encountered an internal error. Please try again.",
    "AccessDenied": "Access Denied",
    "NoSuchKey": "The specified key does not exist.",
}
# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded; the body is re-framed.
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
       "upgrade", "proxy-authenticate", "proxy-authorization", "content-length"}


def error_body(code: str, message: str | None = None) -> bytes:
    message = message or MESSAGES.get(code, code)
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>x</RequestId></Error>").encode()


def _check_loopback(host: str) -> None:
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"fault proxy talks to loopback addresses only, not {host!r}")


@dataclass
class Fault:
    method: str | None = None  # None: any method
    path_contains: str = ""  # matched against the raw path + query
    status: int = 503
    code: str = "SlowDown"
    message: str | None = None  # the error body's <Message>; None: S3's wording for ``code``
    times: int | None = 1  # None: every matching request
    reset: bool = False  # close the connection (RST) without a response
    truncate: bool = False  # forward, but cut the body in half and reset (status is unused)
    hits: int = 0  # requests this rule answered

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (self.method is None or self.method == method) and self.path_contains in target


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        up = urlsplit(upstream)
        _check_loopback(up.hostname or "")
        _check_loopback(host)
        self.upstream = (up.hostname, up.port or 80)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int | str]] = []  # (method, target, status or "reset")
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="s3-fault-proxy",
                                        daemon=True)
        self._thread.start()

    # -- programming faults and reading counters
    def add_fault(self, **kw) -> Fault:
        fault = Fault(**kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        """Requests seen (answered by a fault or forwarded) matching method and path."""
        with self._lock:
            return sum(1 for m, t, _ in self.requests
                       if (method is None or m == method) and path_contains in t)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the request handler
    def _pick(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, target):
                    fault.hits += 1
                    return fault
        return None

    def _log(self, method: str, target: str, outcome: int | str) -> None:
        with self._lock:
            self.requests.append((method, target, outcome))

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:  # quiet
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                method, target = self.command, self.path
                body = self._read_body()
                fault = proxy._pick(method, target)
                if fault is not None and fault.reset:
                    proxy._log(method, target, "reset")
                    self._reset()
                    return
                if fault is not None and not fault.truncate:
                    proxy._log(method, target, fault.status)
                    payload = b"" if method == "HEAD" else error_body(fault.code, fault.message)
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("x-amz-request-id", "x")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body or method in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.request(method, target, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    proxy._log(method, target, "truncated" if fault else resp.status)
                    length = resp.getheader("Content-Length")
                    data = None
                    if length is None or fault:  # chunked upstream: re-frame with a length
                        data = resp.read()
                        length = str(len(data))
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", length)  # HEAD: the object's size
                    self.end_headers()
                    if fault:  # truncate
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self._reset()
                    elif data is not None:
                        self.wfile.write(data)
                    else:  # stream (http.client returns b"" for HEAD / 204 / 304)
                        while chunk := resp.read(65536):
                            self.wfile.write(chunk)
                finally:
                    conn.close()

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST instead of FIN -> "connection reset"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler

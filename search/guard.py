"""What stands between the search page (search/server.py) and the web: Host check, access token, resource limits.

- **Host check (DNS rebinding).** A site the user visits can rebind its own name to 127.0.0.1 and then read this
  server as same-origin, but its requests carry its own name in ``Host``. :class:`HostCheck` answers only Host values
  naming this server; anything else gets 403 with a message naming ``--allowed_host``. It follows
  jupyter_server's ``JupyterHandler.check_host`` (port stripped, ``[...]`` stripped from IPv6, an IP literal allowed
  when loopback, a name when in ``local_hostnames``, default ``localhost``), webpack-dev-server's ``isValidHost`` /
  ``allowedHosts`` (a missing Host is refused; "we don't care about port not matching"; the listening address is
  allowed; an ``allowedHosts`` entry starting with ``.`` also allows its subdomains) and Vite's ``server.allowedHosts``
  (``host-validation-middleware``: the ``--host`` value is allowed; the refusal says which option to set). Unlike
  webpack and Vite, an IP literal that is neither loopback nor the bound address is refused unless the server listens
  on every address (0.0.0.0 / ::), where any IP literal names this machine (a rebound *name* never reaches it as one).
- **Access token.** On a non-loopback address the page needs a random token (``secrets.token_urlsafe``), printed in
  the URL as Jupyter prints its own (``/?token=...``). Taken once from the query string, it is kept in a cookie
  (``HttpOnly; SameSite=Strict``, named per port as Jupyter names its cookie) and the URL is redirected without it;
  scripts may send ``Authorization: token <t>`` (as Jupyter accepts). Compared with ``hmac.compare_digest``.
- **Limits:** :class:`DeadlineReader` (a request must arrive within ``--request_timeout`` seconds, in total, not per
  byte), :class:`CappedThreadingServer` (at most ``--max_connections`` at once, 503 beyond), an image size cap
  (``--max_image_mb``, checked in server.py) and :class:`ModelGate` (a query waits at most ``--model_timeout`` seconds
  for the model, or gets 503 saying so). ``HEAD /api/search`` runs no search (server.py).
"""
from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import queue
import re
import secrets
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit

logger = logging.getLogger("IRRA.search")

# The defaults of visualize.py's --serve options (and of make_server's keywords).
DEFAULT_REQUEST_TIMEOUT = 30.0   # s for a client to send its request line and headers (slowloris)
DEFAULT_MAX_CONNECTIONS = 128    # connections answered at once; 503 beyond (a tab opens at most 6 at a time)
DEFAULT_MAX_IMAGE_MB = 20.0      # gallery images larger than this are not served (413)
DEFAULT_MODEL_TIMEOUT = 60.0     # s a query may wait for the model (its turn and its forward pass)
LOCAL_NAMES = ("localhost",)     # Jupyter's local_hostnames default
WILDCARD = ("0.0.0.0", "::", "")
_NAME = re.compile(r"^\.?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (what only this machine can reach)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def hostname_of(header: str | None) -> str | None:
    """The host name of a Host header value, lower case, without port or IPv6 brackets; None when malformed."""
    if not header:
        return None
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d{1,5}))?|([^:\[\]/@\s]+)(?::(\d{1,5}))?", header.strip())
    if m is None:
        return None
    return (m.group(1) or m.group(3)).lower()


def check_allowed_host(name: str) -> str:
    """An ``--allowed_host`` value, normalised (lower case, no brackets); ValueError naming the option otherwise."""
    n = name.strip().lower()
    try:
        return str(ipaddress.ip_address(n.strip("[]")))
    except ValueError:
        pass
    if not _NAME.fullmatch(n) or ".." in n:
        raise ValueError(f"--allowed_host {name!r} is not a host name: expected a name as the browser shows it "
                         f"(e.g. mybox.lan, or .example.org for it and its subdomains), without scheme, port or path")
    return n


class HostCheck:
    """Which ``Host`` headers name this server: see the module docstring.

    Args:
        bound: the address the server listens on (``--host``).
        allowed: extra names (``--allowed_host``); ``.example.org`` also allows ``*.example.org``.
    """

    def __init__(self, bound: str, allowed: Iterable[str] = ()):
        self.bound = bound.strip("[]").lower()
        try:
            self.bound = str(ipaddress.ip_address(self.bound))  # as the allowed IP literals are compared
        except ValueError:
            pass
        self.wildcard = self.bound in WILDCARD
        self.allowed = tuple(check_allowed_host(a) for a in allowed)
        self.names = set(LOCAL_NAMES) | {a for a in self.allowed if not a.startswith(".")} | {self.bound}
        self.suffixes = tuple(a for a in self.allowed if a.startswith("."))

    def allows(self, header: str | None) -> bool:
        name = hostname_of(header)
        if name is None:
            return False
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return name in self.names or any(name == s[1:] or name.endswith(s) for s in self.suffixes)
        return ip.is_loopback or self.wildcard or str(ip) in self.names

    def refusal(self, header: str | None) -> str:
        if not header:
            return "the request has no Host header: this server answers only requests naming it (DNS rebinding guard)"
        name = hostname_of(header) or header
        return (f"Host {header!r} does not name this server: it answers only localhost, 127.0.0.1, [::1] and the "
                f"address it listens on ({self.bound or '*'}), so that another site cannot read it by rebinding its "
                f"own name to this machine (DNS rebinding). If you reach the page by this name on purpose, restart "
                f"it with --allowed_host {name}")


class AccessToken:
    """The page's login: a random token from the URL, then a cookie. ``check`` says what a request carries."""

    def __init__(self, port: int, token: str | None = None):
        self.token = token or secrets.token_urlsafe(32)
        self.cookie = f"irra_search_token_{port}"  # per port: cookies are shared by every port of a host

    def _same(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def check(self, path: str, headers: Mapping[str, str]) -> str | None:
        """"query" (valid in the URL: set the cookie and redirect, even with a cookie, so that the token leaves the
        address bar), "cookie" / "header" (valid: go on) or None."""
        if any(k == "token" and self._same(v) for k, v in parse_qsl(urlsplit(path).query, keep_blank_values=True)):
            return "query"
        try:
            jar = SimpleCookie(headers.get("Cookie") or "")
        except CookieError:
            jar = SimpleCookie()
        if self.cookie in jar and self._same(jar[self.cookie].value):
            return "cookie"
        auth = (headers.get("Authorization") or "").split()
        if len(auth) == 2 and auth[0].lower() in ("token", "bearer") and self._same(auth[1]):
            return "header"
        return None

    def set_cookie(self) -> str:
        return f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"

    @staticmethod
    def without_token(path: str) -> str:
        """``path`` with its ``token`` parameter dropped (where the redirect goes)."""
        url = urlsplit(path)
        rest = [(k, v) for k, v in parse_qsl(url.query, keep_blank_values=True) if k != "token"]
        return url.path + ("?" + urlencode(rest) if rest else "")

    refusal = ("this page needs its access token: open the address that visualize.py --serve printed "
               "(http://<host>:<port>/?token=...); the page then keeps it in a cookie")


def redact(text: str) -> str:
    """``text`` with any ``token=...`` value hidden (request lines go to the log)."""
    return re.sub(r"(token=)[^&\s\"]*", r"\1[hidden]", text)


def check_limits(request_timeout: float, max_connections: int, max_image_mb: float, model_timeout: float) -> None:
    """ValueError naming the option when a limit is out of range."""
    for name, value in (("--request_timeout", request_timeout), ("--max_image_mb", max_image_mb),
                        ("--model_timeout", model_timeout)):
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{name} must be a positive number of {'MB' if 'mb' in name else 'seconds'}, "
                             f"got {value}")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"--max_connections must be a whole number >= 1, got {max_connections!r}")


class DeadlineReader(io.RawIOBase):
    """A socket read that fails once ``deadline`` (time.monotonic) has passed: a client sending a byte every few
    seconds cannot keep a thread longer than the deadline (a plain socket timeout restarts at each byte). As nginx's
    ``client_header_timeout`` (the whole header); the answer is then written with the same timeout for each write, as
    nginx's ``send_timeout`` (between two writes), so a large image is not cut off on a slow link."""

    def __init__(self, sock, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within --request_timeout")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class ModelTimeout(Exception):
    """The model did not answer in time (the page shows the message)."""


class ModelGate:
    """Model calls one at a time on one worker thread; a caller waits at most ``timeout`` seconds.

    A call that times out is dropped if it has not started; a forward pass that hangs keeps the worker, and every
    later call is answered at once (not after another ``timeout``) while it is stuck. Python cannot stop a thread, so
    the hung pass goes on in the background: the server still answers everything else.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._busy_since: float | None = None
        self._running: Future | None = None
        self._stuck: Future | None = None  # a running call whose caller gave up waiting
        self._thread = threading.Thread(target=self._work, name="search-model", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            fut, fn, args = self._jobs.get()
            if fut is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue  # its caller gave up before its turn
            self._running, self._busy_since = fut, time.monotonic()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 (handed to the caller)
                fut.set_exception(e)
            finally:
                self._running = self._busy_since = None

    def call(self, fn: Callable, *args):
        """``fn(*args)`` on the worker; its result or exception, or ModelTimeout after ``timeout`` seconds."""
        since, running = self._busy_since, self._running
        stuck = running is not None and running is self._stuck
        if since is not None and (stuck or time.monotonic() - since > self.timeout):
            raise ModelTimeout(f"the model has been busy for {time.monotonic() - since:.0f} s with an earlier query, "
                               f"longer than --model_timeout ({self.timeout:g} s): this query was not run. The "
                               f"server still answers; try again later, or restart it if this lasts")
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        try:
            return fut.result(timeout=self.timeout)
        except FutureTimeout:
            if fut.cancel() or not fut.done():
                if not fut.cancelled():
                    self._stuck = fut
                logger.warning("search page: a query found no answer from the model within %g s", self.timeout)
                raise ModelTimeout(f"the model did not answer within {self.timeout:g} s (--model_timeout): this "
                                   f"query was dropped. The server still answers; try again in a moment") from None
            return fut.result()  # it finished just now

    def close(self) -> None:
        self._jobs.put((None, None, None))


BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nRetry-After: 2\r\n"
        b"Connection: close\r\nCache-Control: no-store\r\nContent-Length: %d\r\n\r\n%s")


class CappedThreadingServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once; beyond, the accepting thread answers 503 itself
    (no thread, a few ms) and closes. A slot is freed when its handler returns, which ``--request_timeout`` bounds
    for a client that never finishes its request."""

    def __init__(self, *args, max_connections: int = DEFAULT_MAX_CONNECTIONS, **kwargs):
        self.max_connections, self._slots = max_connections, threading.BoundedSemaphore(max_connections)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            return self._busy(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _busy(self, request) -> None:
        logger.warning("search page: %d connections open (--max_connections): answered 503", self.max_connections)
        msg = json.dumps({"error": f"the search page is answering {self.max_connections} connections already "
                                   f"(--max_connections): try again in a moment"}).encode()
        try:
            request.settimeout(0.05)
            request.sendall(BUSY % (len(msg), msg))
            request.shutdown(socket.SHUT_WR)
            while request.recv(1 << 16):  # drain what the client sent, so that closing does not reset the answer
                pass
        except OSError:
            pass
        finally:
            request.close()


class CheckedHandler(BaseHTTPRequestHandler):
    """A request handler whose request must arrive within ``timeout`` seconds (:class:`DeadlineReader`) and which
    admits a request only past the server's ``host_check`` and ``access_token`` (:meth:`_admitted`). A subclass
    defines ``_json(obj, status)``, which answers with a JSON body."""

    timeout: float = DEFAULT_REQUEST_TIMEOUT

    def setup(self) -> None:
        super().setup()
        plain, self.rfile = self.rfile, io.BufferedReader(DeadlineReader(self.connection,
                                                                         time.monotonic() + self.timeout))
        plain.close()  # else the socket stays open after the handler closes it

    def _admitted(self) -> bool:
        """The Host check, then the access token (if the page has one); answers and returns False if refused."""
        host = self.headers.get("Host")
        if not self.server.host_check.allows(host):
            logger.warning("search page: refused a request with Host %r (not this server's name)", host)
            self._json({"error": self.server.host_check.refusal(host)}, HTTPStatus.FORBIDDEN)
            return False
        token = self.server.access_token
        if token is None:
            return True
        how = token.check(self.path, self.headers)
        if how == "query":  # from the printed URL: keep it in a cookie, drop it from the address bar
            self.connection.settimeout(self.timeout)
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", token.without_token(self.path))
            self.send_header("Set-Cookie", token.set_cookie())
            self.send_header("Cache-Control", "no-store")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        if how is None:
            self._json({"error": token.refusal}, HTTPStatus.FORBIDDEN)
            return False
        return True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("%s %s", self.address_string(), redact(format % args))

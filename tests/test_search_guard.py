"""The search page against the web (search/guard.py, search/server.py): Host check, access token, limits.

Over HTTP with raw requests (custom Host headers, slow and idle clients, HEAD, a large image, a model that hangs)
and in headless Chromium (a rebound name, the token's cookie, the timeout message). Every server listens on
127.0.0.1; Chromium maps the test names rebind.test / allowed.test to 127.0.0.1 itself (--host-resolver-rules).
"""
import contextlib
import hashlib
import http.client
import json
import logging
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

import visualize
from search import guard as G
from search import server as S
from tests.test_search_page import CHROMIUM_ARGS, CHROMIUM_INSTALL, QUERIES, chromium_path, expect, make_photo_folder, \
    q, wait_results
from tests.test_search_page import retriever, split  # noqa: F401 (fixtures: the tiny run's Retriever and test split)


class Live:
    """A server of ``page`` (make_server's keywords), serving in a thread, reached at 127.0.0.1."""

    def __init__(self, page, host="127.0.0.1", **kw):
        self.server = S.make_server(page, host, 0, **kw)
        self.port = self.server.server_address[1]
        self.url = S.page_url(self.server)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path, method="GET", host="default", headers=None):
        """(status, headers, body); ``host``: the Host header sent ("default": 127.0.0.1:port, None: none)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            if host is not None:
                c.putheader("Host", f"127.0.0.1:{self.port}" if host == "default" else host)
            for k, v in (headers or {}).items():
                c.putheader(k, v)
            c.endheaders()
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def json(self, path, **kw):
        status, _, body = self.get(path, **kw)
        return status, json.loads(body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@contextlib.contextmanager
def search_log(level=logging.DEBUG):
    """Records of the IRRA.search logger (a handler on it: train.main's setup_logger turns off propagation to the
    root logger, where caplog listens)."""
    records, handler, lg = [], logging.Handler(level), logging.getLogger("IRRA.search")
    handler.emit = records.append
    old = lg.level
    lg.addHandler(handler)
    lg.setLevel(level)
    try:
        yield records
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old)


@pytest.fixture
def live():
    servers = []
    yield lambda page, **kw: servers.append(Live(page, **kw)) or servers[-1]
    for s in servers:
        s.close()


@pytest.fixture
def folder_page(retriever, split, tmp_path):
    return S.SearchPage.for_folder(retriever, make_photo_folder(tmp_path / "photos", split, link=False),
                                   progress=False)


@pytest.fixture
def search_calls(retriever, monkeypatch):
    """Counts the model's searches (Retriever.search of the page's retriever)."""
    calls, real = [], retriever.search
    monkeypatch.setattr(retriever, "search", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    return calls


# ------------------------------------------------------------------------------------------------ DNS rebinding
def test_host_check_rules():
    h = G.HostCheck("127.0.0.1")
    ok = ["localhost", "localhost:7860", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:80", "[::1]", "[::1]:7860",
          "127.0.0.2", "[0:0:0:0:0:0:0:1]:5"]
    bad = [None, "", "attacker.example", "attacker.example:7860", "localhost.attacker.example", "127.0.0.1.nip.io",
           "10.0.0.5", "[fe80::1]", "::1", "localhost:x", "localhost:7860:1", "user@localhost", "local host",
           "localhost/", "0.0.0.0"]
    assert [x for x in ok if not h.allows(x)] == [] and [x for x in bad if h.allows(x)] == []
    assert "--allowed_host attacker.example" in h.refusal("attacker.example:7860")
    assert "no Host header" in h.refusal(None)
    # the bound address, names given with --allowed_host (".x" = x and its subdomains), any IP on a wildcard bind
    h = G.HostCheck("192.168.1.5", ["MyBox.lan", ".example.org", "[fd00::2]"])
    assert all(h.allows(x) for x in ["192.168.1.5:7860", "mybox.lan", "example.org:1", "a.b.example.org",
                                     "[fd00::2]:7860", "localhost"])
    assert not any(h.allows(x) for x in ["192.168.1.6", "mybox.lan.evil", "badexample.org", "[fd00::3]"])
    assert G.HostCheck("0.0.0.0").allows("10.1.2.3:7860") and not G.HostCheck("0.0.0.0").allows("evil.test")
    assert G.HostCheck("::").allows("[fd00::9]") and G.HostCheck("mybox.lan").allows("mybox.lan:1")
    assert G.HostCheck("FD00:0::0002").allows("[fd00::2]:7860") and not G.HostCheck("fd00::2").allows("[fd00::3]")
    for bad_name in ["http://x", "x:80", "a/b", "", "a b", "x..y", "-x"]:
        with pytest.raises(ValueError, match="--allowed_host"):
            G.check_allowed_host(bad_name)


def test_foreign_host_header_is_refused_over_http(folder_page, live, search_calls):
    srv = live(folder_page, allowed_hosts=["allowed.test"])
    for path in ("/", "/api/info", f"/api/search?q={q(QUERIES[0])}", "/image/0", "/api/failures", "/static/app.js"):
        for host in ("attacker.example", f"attacker.example:{srv.port}", "127.0.0.1.attacker.example", None):
            status, _, body = srv.get(path, host=host)
            err = json.loads(body)["error"]
            assert status == 403 and ("DNS rebinding" in err or "no Host header" in err), (path, host)
            assert b"photos" not in body and b"gallery_size" not in body  # nothing of the gallery
        status, _, body = srv.get(path, method="POST", host="attacker.example")
        assert status == 403
    assert search_calls == [], "a refused request must not reach the model"
    for host in ("localhost", f"localhost:{srv.port}", "127.0.0.1", f"[::1]:{srv.port}", "allowed.test",
                 f"ALLOWED.test:{srv.port}"):
        status, info = srv.json("/api/info", host=host)
        assert status == 200 and info["gallery_size"] == len(folder_page.gallery), host
    status, res = srv.json(f"/api/search?q={q(QUERIES[0])}&k=3", host="allowed.test")
    assert status == 200 and [r["index"] for r in res["results"]] == \
        folder_page.retriever.search(QUERIES[0], folder_page.gallery, 3)[1].tolist()


# ------------------------------------------------------------------------------------------------ access token
def test_token_flow_over_http(folder_page, live):
    with search_log() as records:
        token = _token_flow(folder_page, live)
    logged = "\n".join(r.getMessage() for r in records)
    assert token not in logged and "token=[hidden]" in logged and "GET /?k=3&token=[hidden]" in logged


def _token_flow(folder_page, live) -> str:
    """The token's checks over HTTP (the log is read by the caller); returns the token."""
    srv = live(folder_page, token=True)
    token = srv.server.access_token.token
    assert srv.url == f"http://127.0.0.1:{srv.port}/?token={token}" and len(token) >= 40
    assert live(folder_page).server.access_token is None  # on loopback, none by default
    for path in ("/", "/api/info", "/image/0", "/?token=", "/?token=" + token[:-1] + "x", "/?token=" + token + "x",
                 f"/?token=%FF{token}"):
        status, _, body = srv.get(path)
        assert status == 403 and "access token" in json.loads(body)["error"], path
    for bad in (f"{srv.server.access_token.cookie}={token[:-1]}", f"irra_search_token_1={token}", "junk;;=\x7f"):
        assert srv.get("/api/info", headers={"Cookie": bad})[0] == 403, bad
    assert srv.get("/api/info", headers={"Authorization": "token nope"})[0] == 403
    # once from the URL: a cookie (HttpOnly, SameSite=Strict) and a redirect to the same URL without it
    status, headers, _ = srv.get(f"/?k=3&token={token}")
    assert status == 303 and headers["Location"] == "/?k=3"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"irra_search_token_{srv.port}={token};")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    jar = {"Cookie": cookie.split(";")[0]}
    status, _, body = srv.get("/", headers=jar)
    assert status == 200 and b"/static/app.js" in body
    status, res = srv.json(f"/api/search?q={q(QUERIES[1])}&k=2", headers=jar)
    assert status == 200 and len(res["results"]) == 2
    assert srv.get("/api/info", headers={"Authorization": f"token {token}"})[0] == 200  # scripts, as Jupyter's
    status, headers, _ = srv.get(f"/?token={token}", headers=jar)  # with the cookie too: still out of the URL
    assert status == 303 and headers["Location"] == "/"
    # the Host check comes first: the token does not open the page to a rebound name
    assert srv.get("/api/info", headers=jar, host="attacker.example")[0] == 403
    return token


@pytest.fixture
def bind_loopback(monkeypatch):
    """Servers asked to listen on 0.0.0.0 listen on 127.0.0.1 (tests stay on this machine)."""
    real = S._Server.server_bind

    def server_bind(self):
        self.server_address = ("127.0.0.1", self.server_address[1])
        real(self)

    monkeypatch.setattr(S._Server, "server_bind", server_bind)


def test_non_loopback_address_needs_token(run_dir, split, tmp_path, folder_page, live, bind_loopback, capsys,
                                          monkeypatch):
    srv = live(folder_page, host="0.0.0.0")
    assert srv.server.access_token is not None and "?token=" in srv.url
    assert srv.get("/api/info")[0] == 403
    status, headers, _ = srv.get("/?token=" + srv.server.access_token.token, host=f"10.1.2.3:{srv.port}")
    assert status == 303  # any IP literal names a server listening on every address; a name does not
    assert srv.get("/?token=" + srv.server.access_token.token, host="evil.test")[0] == 403
    # visualize.py --serve --host 0.0.0.0 prints the URL with the token; --no_token drops it, with a warning
    seen = []

    def serve_forever(self, *a, **kw):
        seen.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(S._Server, "serve_forever", serve_forever)
    folder = make_photo_folder(tmp_path / "photos2", split, link=False)
    base = ["--config_file", str(run_dir), "--serve", "--gallery", str(folder), "--port", "0", "--device", "cpu",
            "--num_workers", "0", "--host", "0.0.0.0"]
    visualize.main(base)
    out = capsys.readouterr().out
    assert f"?token={seen[-1].access_token.token}" in out
    with search_log(logging.WARNING) as warned:
        visualize.main(base + ["--no_token"])
    assert seen[-1].access_token is None and "?token=" not in capsys.readouterr().out
    assert any("without an access token (--no_token)" in r.getMessage() for r in warned)


# ------------------------------------------------------------------------------------------------ limits
def test_slow_and_idle_clients_are_cut_off(folder_page, live):
    srv = live(folder_page, request_timeout=1.0)
    start = time.monotonic()
    slow = socket.create_connection(("127.0.0.1", srv.port))
    slow.sendall(b"GET /api/info HTTP/1.0\r\n")
    idle = socket.create_connection(("127.0.0.1", srv.port))
    cut = None
    while time.monotonic() - start < 8:  # a header byte every 0.2 s: each read is quick, the whole request is not
        try:
            slow.sendall(b"X")
        except OSError:  # the server closed: the next send fails
            cut = time.monotonic() - start
            break
        time.sleep(0.2)
    assert cut is not None and 0.9 < cut < 5, cut
    idle.settimeout(5)
    assert idle.recv(100) == b""  # closed by the server, nothing answered
    slow.close()
    idle.close()
    assert srv.json("/api/info")[0] == 200


def wait_until(cond, seconds=10.0):
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    assert cond()


def test_connection_cap_answers_503(folder_page, live):
    srv = live(folder_page, max_connections=3, request_timeout=10)
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
    wait_until(lambda: srv.server._slots._value == 0)  # the server has accepted the three
    status, headers, body = srv.get("/api/info")
    assert status == 503 and "--max_connections" in json.loads(body)["error"] and headers["Retry-After"]
    for s in idle:
        s.close()
    wait_until(lambda: srv.server._slots._value == 3)
    assert srv.json("/api/info")[0] == 200


def test_head_runs_no_search_and_reads_no_image(folder_page, live, search_calls):
    srv = live(folder_page)
    status, headers, body = srv.get(f"/api/search?q={q(QUERIES[0])}", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Type"].startswith("application/json")
    assert search_calls == []
    assert srv.json(f"/api/search?q={q(QUERIES[0])}")[0] == 200 and search_calls == [QUERIES[0]]
    status, headers, body = srv.get("/image/0", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == \
        Path(folder_page.gallery.paths[0]).stat().st_size


def _download(srv, path):
    """(status, sha256, bytes) of a response read 64 KB at a time."""
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    h, n = hashlib.sha256(), 0
    while chunk := r.read(1 << 16):
        h.update(chunk)
        n += len(chunk)
    c.close()
    return r.status, h.hexdigest(), n


def test_large_images_are_streamed_and_refused_over_the_cap(folder_page, live):
    paths = [Path(p) for p in folder_page.gallery.paths]
    big = paths[0].read_bytes() + b"\0" * (12 * 2**20)  # a valid PNG with 12 MB of trailing bytes
    paths[0].write_bytes(big)
    paths[1].write_bytes(paths[1].read_bytes() + b"\0" * (21 * 2**20))  # over the default cap of 20 MB
    srv = live(folder_page)
    tracemalloc.start()
    try:
        status, digest, n = _download(srv, "/image/0")
        _, peak = tracemalloc.get_traced_memory()
        assert status == 200 and n == len(big) and digest == hashlib.sha256(big).hexdigest()
        assert peak < 4 * 2**20, f"serving a 12 MB image should not hold it in memory (peak {peak / 2**20:.1f} MB)"
        tracemalloc.reset_peak()
        status, _, body = srv.get("/image/1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = json.loads(body)["error"]
    assert status == 413 and "21.0 MB" in err and "cap of 20 MB (--max_image_mb)" in err
    assert peak < 2 * 2**20
    srv2 = live(folder_page, max_image_mb=5)
    assert srv2.get("/image/0")[0] == 413 and srv2.get("/image/2")[0] == 200


@pytest.fixture
def hung_model(retriever, monkeypatch):
    """The first Retriever.search hangs until ``release`` is set (at most 30 s); later ones answer."""
    release, entered, real = threading.Event(), threading.Event(), retriever.search
    state = {"first": True}

    def search(*a, **kw):
        if state.pop("first", False):
            entered.set()
            release.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(retriever, "search", search)
    yield release, entered
    release.set()


def test_hung_model_call_is_bounded(folder_page, live, hung_model):
    release, entered = hung_model
    srv = live(folder_page, model_timeout=0.5)
    start = time.monotonic()
    status, headers, body = srv.get(f"/api/search?q={q(QUERIES[0])}")
    took = time.monotonic() - start
    res = json.loads(body)
    assert status == 503 and res["timeout"] is True and 0.4 < took < 5 and entered.is_set()
    assert "did not answer within 0.5 s (--model_timeout)" in res["error"] and headers["Retry-After"]
    start = time.monotonic()  # while it hangs, a query is answered at once, and the rest of the page works
    status, res = srv.json(f"/api/search?q={q(QUERIES[1])}")
    assert status == 503 and "has been busy" in res["error"] and time.monotonic() - start < 5  # not queued again
    assert srv.json("/api/info")[0] == 200 and srv.get("/image/0")[0] == 200
    release.set()
    wait_until(lambda: srv.server.gate._busy_since is None)
    status, res = srv.json(f"/api/search?q={q(QUERIES[1])}&k=3")
    assert status == 200 and [r["index"] for r in res["results"]] == \
        folder_page.retriever.search(QUERIES[1], folder_page.gallery, 3)[1].tolist()


def test_limit_options_are_checked(folder_page, run_dir, capsys):
    good = dict(request_timeout=1, max_connections=1, max_image_mb=1, model_timeout=1)
    for name, bad in (("request_timeout", 0), ("request_timeout", float("nan")), ("max_connections", 0),
                      ("max_connections", 1.5), ("max_image_mb", -1), ("model_timeout", float("inf"))):
        with pytest.raises(ValueError, match=f"--{name} must be"):
            G.check_limits(**{**good, name: bad})
        with pytest.raises(ValueError, match=f"--{name}"):
            S.make_server(folder_page, "127.0.0.1", 0, **{**good, name: bad})
    base = ["--config_file", str(run_dir), "--serve", "--port", "0"]
    for extra, msg in ((["--request_timeout", "0"], "--request_timeout must be"),
                       (["--max_connections", "0"], "--max_connections must be"),
                       (["--max_image_mb", "-2"], "--max_image_mb must be"),
                       (["--model_timeout", "nan"], "--model_timeout must be"),
                       (["--allowed_host", "http://x/"], "--allowed_host 'http://x/' is not a host name")):
        with pytest.raises(SystemExit):
            visualize.main(base + extra)
        assert msg in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        visualize.main(["--config_file", str(run_dir), "--no_token", "--model_timeout", "5"])
    assert "--no_token, --model_timeout go with --serve" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ in Chromium
@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium resolving rebind.test and allowed.test to 127.0.0.1 (a rebound name)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"browser test: the playwright package is missing; {CHROMIUM_INSTALL}")
    exe = chromium_path()
    if exe is None:
        pytest.skip(f"browser test: no chromium executable found; {CHROMIUM_INSTALL}")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS + [
            "--host-resolver-rules=MAP rebind.test 127.0.0.1, MAP allowed.test 127.0.0.1"])
        yield b
        b.close()


def new_tab(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = ctx.new_page()
    tab.set_default_timeout(30_000)
    return ctx, tab


def test_browser_rebound_name_is_refused(browser, folder_page, live):
    srv = live(folder_page, allowed_hosts=["allowed.test"])
    ctx, tab = new_tab(browser)
    resp = tab.goto(f"http://rebind.test:{srv.port}/")
    assert resp.status == 403 and "DNS rebinding" in tab.locator("body").inner_text()
    # the attacker's page, same-origin with its rebound name, reads nothing
    got = tab.evaluate("async () => { const r = await fetch('/api/info'); return [r.status, await r.text()]; }")
    assert got[0] == 403 and "gallery" not in got[1]
    resp = tab.goto(f"http://allowed.test:{srv.port}/")  # a name given with --allowed_host works
    assert resp.status == 200
    tab.locator("#query").fill(QUERIES[0])
    wait_results(tab, min(10, len(folder_page.gallery)))
    ctx.close()


def test_browser_token_kept_in_an_http_only_cookie(browser, folder_page, live):
    srv = live(folder_page, token=True)
    ctx, tab = new_tab(browser)
    base = f"http://127.0.0.1:{srv.port}/"
    resp = tab.goto(base)
    assert resp.status == 403 and "access token" in tab.locator("body").inner_text()
    tab.goto(srv.url)  # the printed address, with ?token=
    assert tab.url == base  # redirected: the token left the address bar (and the history)
    expect(tab.locator("#about")).to_contain_text("images of")
    tab.locator("#query").fill(QUERIES[1])
    wait_results(tab, min(10, len(folder_page.gallery)))
    expect(tab.locator('#results .result[data-rank="1"] img')).to_have_js_property("complete", True)
    assert tab.locator('#results .result[data-rank="1"] img').evaluate("i => i.naturalWidth") > 0
    (cookie,) = ctx.cookies()
    assert cookie["name"] == f"irra_search_token_{srv.port}" and cookie["value"] == srv.server.access_token.token
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert tab.evaluate("document.cookie") == ""  # the page's script cannot read it
    ctx2, tab2 = new_tab(browser)  # another browser profile, without the cookie
    assert tab2.goto(base).status == 403
    ctx2.close()
    ctx.close()


def test_browser_shows_model_timeout(browser, folder_page, live, hung_model):
    release, _ = hung_model
    srv = live(folder_page, model_timeout=0.5)
    ctx, tab = new_tab(browser)
    tab.goto(srv.url)
    expect(tab.locator("#about")).to_contain_text("images of")
    tab.locator("#query").fill(QUERIES[0])
    expect(tab.locator("#status")).to_contain_text("the model did not answer within 0.5 s (--model_timeout)")
    assert "error" in tab.locator("#status").get_attribute("class")
    release.set()
    wait_until(lambda: srv.server.gate._busy_since is None)
    tab.locator("#query").fill(QUERIES[2])
    wait_results(tab, min(10, len(folder_page.gallery)))
    ctx.close()


def test_browser_marks_an_image_over_the_cap(browser, folder_page, live):
    top1 = int(folder_page.retriever.search(QUERIES[3], folder_page.gallery, 1)[1][0])
    big = Path(folder_page.gallery.paths[top1])
    big.write_bytes(big.read_bytes() + b"\0" * (2 * 2**20))  # 2 MB: over a cap of 1 MB
    srv = live(folder_page, max_image_mb=1)
    ctx, tab = new_tab(browser)
    tab.goto(srv.url)
    expect(tab.locator("#about")).to_contain_text("images of")
    tab.locator("#query").fill(QUERIES[3])
    wait_results(tab, min(10, len(folder_page.gallery)))
    first = tab.locator('#results .result[data-rank="1"]')
    assert int(first.get_attribute("data-index")) == top1
    expect(first).to_have_class("result unserved")
    assert "image not served: over the server's size cap" in first.get_attribute("title")
    second = tab.locator('#results .result[data-rank="2"]')
    expect(second.locator("img")).to_have_js_property("complete", True)
    assert "unserved" not in second.get_attribute("class") and second.locator("img").evaluate("i => i.naturalWidth")
    got = tab.evaluate("async (i) => { const r = await fetch('/image/' + i); return [r.status, await r.text()]; }",
                       top1)
    assert got[0] == 413 and "(--max_image_mb)" in got[1]
    ctx.close()

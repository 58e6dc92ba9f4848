"""The browser search page (search/server.py, visualize.py --serve) on a tiny trained run, over HTTP.

The run is a real one (train.main, one epoch of a scratch ViT-Micro on a tiny SynthPEDES, as tests/test_visualize.py
makes it); rankings, R1/mAP and the failures are checked against values computed here without the page.
The browser test (real headless Chromium) is tests/test_search_browser.py.
"""
import http.client
import json
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

import visualize
from datasets import build as dbuild
from search import retrieval as R
from search import server as S
from utils.metrics import rank
from tests.conftest import independent_similarity

QUERIES = ["a man in a blue jacket with a black backpack", "a woman with long blonde hair in a red skirt",
           "a person in white shoes", "someone wearing a green coat and grey trousers"]


@pytest.fixture(scope="module")
def retriever(run_dir):
    return R.Retriever.from_run(run_dir, device="cpu")


@pytest.fixture(scope="module")
def split(tiny_synth, run_dir):
    return dbuild.build_dataset("SynthPEDES", root=str(tiny_synth), verbose=False).test


def make_photo_folder(folder: Path, split: dict, link: bool = True) -> Path:
    """Some test images in sub-folders, a non-image, an image beside the folder, and (``link``) a symlink to it."""
    for i, p in enumerate(split["img_paths"][:6]):
        sub = folder / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, sub / f"photo{i}.png")
    (folder / "notes.txt").write_text("not an image")
    outside = folder.parent / "secret.png"
    Image.new("RGB", (32, 64), (1, 2, 3)).save(outside)
    if link:
        os.symlink(outside, folder / "link_out.png")
    return folder


class Live:
    """A server of ``page`` on a free port of 127.0.0.1, serving in a thread."""

    def __init__(self, page):
        self.server = S.make_server(page, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.url = S.page_url(self.server)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str, method: str = "GET"):
        """(status, headers, body) of a raw request: the path is sent exactly as given (no normalisation)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.putrequest(method, path, skip_accept_encoding=True)
            c.endheaders()
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def json(self, path: str):
        status, _, body = self.get(path)
        return status, json.loads(body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def live():
    servers = []
    yield lambda page: servers.append(Live(page)) or servers[-1]
    for s in servers:
        s.close()


def q(text: str) -> str:
    from urllib.parse import quote
    return quote(text, safe="")


def test_test_split_page_metrics_truth_and_failures(run_dir, retriever, split, live):
    page = S.SearchPage.for_test_split(retriever, split, progress=False)
    assert page.gallery.paths == split["img_paths"]
    sim = independent_similarity(run_dir, split)
    q_pids, g_pids = torch.tensor(split["caption_pids"]), torch.tensor(split["image_pids"])
    cmc, mAP, mINP, _ = rank(sim, q_pids, g_pids, max_rank=10)
    info = page.info()
    assert info["mode"] == "test" and info["gallery_size"] == 10 and info["num_queries"] == 20
    assert info["metrics"]["R1"] == pytest.approx(float(cmc[0]), abs=1e-3)
    assert info["metrics"]["R5"] == pytest.approx(float(cmc[4]), abs=1e-3)
    assert info["metrics"]["mAP"] == pytest.approx(float(mAP), abs=1e-3)
    top1_pid = g_pids[sim.argmax(dim=1)]
    wrong = [i for i in range(len(q_pids)) if top1_pid[i] != q_pids[i]]
    assert wrong and len(wrong) < len(q_pids), "the tiny model should get some queries right and some wrong"
    assert [f["index"] for f in page.failures()] == wrong and info["num_failures"] == len(wrong)

    srv = live(page)
    status, fails = srv.json("/api/failures")
    assert status == 200 and [f["index"] for f in fails] == wrong
    assert all(f["top1_pid"] == int(top1_pid[f["index"]]) and f["pid"] == split["caption_pids"][f["index"]]
               for f in fails)
    k = 4
    scores, idx = sim.topk(k, dim=1)
    for i in (wrong[0], 0, 19):
        status, res = srv.json(f"/api/search?test_query={i}&k={k}")
        assert status == 200 and res["query"] == split["captions"][i]
        pid = split["caption_pids"][i]
        assert [r["index"] for r in res["results"]] == idx[i].tolist()
        assert [r["score"] for r in res["results"]] == pytest.approx(scores[i].tolist(), abs=1e-4)
        assert [r["match"] for r in res["results"]] == [split["image_pids"][j] == pid for j in idx[i].tolist()]
        assert [r["name"] for r in res["results"]] == [Path(split["img_paths"][j]).name for j in idx[i].tolist()]
        t = res["truth"]
        assert t["index"] == i and t["pid"] == pid and t["top1_correct"] == (i not in wrong)
        assert t["images"] == [j for j, p in enumerate(split["image_pids"]) if p == pid] and t["images"]
    # a typed sentence equal to a test caption gets its ground truth; any other sentence gets pids, no verdict
    status, res = srv.json(f"/api/search?q={q(split['captions'][3] + ' ')}&k=3")
    assert res["truth"]["index"] == 3 and "match" in res["results"][0]
    status, res = srv.json(f"/api/search?q={q(QUERIES[0])}&k=3")
    assert status == 200 and res["truth"] is None
    assert all("match" not in r and r["pid"] == split["image_pids"][r["index"]] for r in res["results"])
    status, res = srv.json("/api/search?test_query=20")
    assert status == 400 and "out of range" in res["error"] and "0..19" in res["error"]


def test_folder_page_serves_only_gallery_images(run_dir, retriever, split, tmp_path, live):
    folder = make_photo_folder(tmp_path / "photos", split)
    page = S.SearchPage.for_folder(retriever, folder, progress=False)
    srv = live(page)
    secret = (tmp_path / "secret.png").read_bytes()
    status, headers, body = srv.get("/")
    assert status == 200 and b"/static/app.js" in body
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    status, info = srv.json("/api/info")
    assert info["mode"] == "folder" and info["metrics"] is None and info["gallery_size"] == len(page.gallery)
    assert info["text_length"] == 77

    for text in QUERIES[:2]:
        status, res = srv.json(f"/api/search?q={q(text)}&k=5")
        scores, idx = retriever.search(text, page.gallery, 5)
        assert status == 200 and [r["index"] for r in res["results"]] == idx.tolist()
        assert [r["score"] for r in res["results"]] == pytest.approx(scores.tolist(), abs=1e-6)
        assert [r["rank"] for r in res["results"]] == [1, 2, 3, 4, 5]
        assert [r["path"] for r in res["results"]] == [str(Path(page.gallery.paths[j]).relative_to(folder))
                                                       for j in idx.tolist()]
        assert res["truth"] is None and "pid" not in res["results"][0]
    for j, p in enumerate(page.gallery.paths):  # each gallery image by its index, and only by it
        status, headers, body = srv.get(f"/image/{j}")
        assert Path(p).name != "link_out.png"  # list_images skips links out of the folder
        assert status == 200 and body == Path(p).read_bytes() and headers["Content-Type"] == "image/png"
    # second line of defence: a gallery file turned into a link out of the folder after listing is refused
    victim = Path(page.gallery.paths[0])
    victim.unlink()
    os.symlink(tmp_path / "secret.png", victim)
    status, _, body = srv.get("/image/0")
    assert status == 403 and body != secret and "outside the gallery folder" in json.loads(body)["error"]
    n = len(page.gallery)
    refused = [f"/image/{n}", "/image/-1", "/image/+1", "/image/0x1", "/image/1.0", "/image/%31", "/image/",
               "/image/../../../../etc/passwd", "/image/..%2f..%2fsecret.png", f"/image/{tmp_path}/secret.png",
               f"/image//{tmp_path}/secret.png", "/image/photo0.png", "/secret.png", "/../secret.png",
               "/static/../server.py", "/static/server.py", "/etc/passwd", f"/{tmp_path}/secret.png",
               "//etc/passwd", "/image/%D9%A1"]
    for path in refused:
        status, _, body = srv.get(path)
        assert status in (403, 404), path
        assert body != secret and "error" in json.loads(body), path
    status, _, body = srv.get("/api/info", method="POST")
    assert status == 405 and "only reads" in json.loads(body)["error"]
    status, body = srv.json("/api/failures")
    assert status == 404 and "no ground truth" in body["error"]
    status, body = srv.json("/api/search?q=a+man&test_query=0")
    assert status == 400 and "only known on the test split" in body["error"]


def test_clear_messages_for_bad_queries(retriever, split, tmp_path, live):
    page = S.SearchPage.for_folder(retriever, make_photo_folder(tmp_path / "photos", split), progress=False)
    srv = live(page)
    for path in ("/api/search", "/api/search?q=", "/api/search?q=%20%20%0A"):
        status, body = srv.json(path)
        assert status == 400 and body["error"] == "the query is empty: type a sentence describing the person"
    status, body = srv.json("/api/search?q=" + "a" * (S.MAX_QUERY_CHARS + 1))
    assert status == 413 and f"at most {S.MAX_QUERY_CHARS}" in body["error"]
    status, body = srv.json("/api/search?q=%26nbsp%3B")  # nothing left once cleaned
    assert status == 400 and "holds no words" in body["error"]
    n = len(page.gallery)  # the 6 photos (the symlink out of the folder is not listed)
    for k, msg in (("0", f"between 1 and {n}"), (str(n + 1), f"between 1 and {n}"), ("x", "whole number")):
        status, body = srv.json(f"/api/search?q=a+man&k={k}")
        assert status == 400 and msg in body["error"], k
    # a sentence longer than text_length tokens is cut as the Retriever cuts it, and the page says what was kept
    long = " ".join(["a man in a red jacket"] * 30)
    status, res = srv.json(f"/api/search?q={q(long)}&k=2")
    assert status == 200 and res["cut"] and res["num_tokens"] == 182
    assert res["kept_text"] == retriever.kept_text(long) and len(res["kept_text"].split()) == 75
    assert [r["index"] for r in res["results"]] == retriever.search(long, page.gallery, 2)[1].tolist()
    status, res = srv.json("/api/search?q=a+man&k=2")
    assert not res["cut"] and res["kept_text"] == "a man"


def test_concurrent_queries_from_threads_are_answered_correctly(retriever, split, tmp_path, live):
    page = S.SearchPage.for_folder(retriever, make_photo_folder(tmp_path / "photos", split), progress=False)
    want = {t: retriever.search(t, page.gallery, 5) for t in QUERIES}
    srv = live(page)

    def ask(i):
        text = QUERIES[i % len(QUERIES)]
        status, res = srv.json(f"/api/search?q={q(text)}&k=5")
        return text, status, res

    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(ask, range(48)))
    for text, status, res in answers:
        scores, idx = want[text]
        assert status == 200 and res["query"] == text
        assert [r["index"] for r in res["results"]] == idx.tolist()
        assert [r["score"] for r in res["results"]] == pytest.approx(scores.tolist(), abs=1e-6)


def test_serve_command_binds_localhost_prints_address_and_encodes_once(run_dir, split, tmp_path, capsys,
                                                                       monkeypatch):
    folder = make_photo_folder(tmp_path / "photos", split)
    seen, loads, encoded = [], [], []
    real_from_run, real_encode = R.Retriever.from_run, R.Retriever.encode_images
    monkeypatch.setattr(R.Retriever, "from_run", classmethod(
        lambda cls, *a, **kw: loads.append(a) or real_from_run(*a, **kw)))
    monkeypatch.setattr(R.Retriever, "encode_images",
                        lambda self, paths, progress=True: encoded.append(len(paths)) or real_encode(self, paths,
                                                                                                      progress))

    def fake_serve_forever(self, *a, **kw):
        seen.append((self.server_address, self.RequestHandlerClass.page))
        raise KeyboardInterrupt

    monkeypatch.setattr(S._Server, "serve_forever", fake_serve_forever)
    base = ["--config_file", str(run_dir / "configs.yaml"), "--serve", "--port", "0", "--device", "cpu",
            "--num_workers", "0"]
    n = len(R.list_images(folder))
    visualize.main(base + ["--gallery", str(folder)])
    out = capsys.readouterr().out
    (host, port), page = seen[-1]
    assert host == "127.0.0.1" and f"http://127.0.0.1:{port}/" in out and f"over {n} images" in out
    assert len(loads) == 1 and encoded == [n] and page.root == folder.resolve()
    visualize.main(base + ["--gallery", str(folder)])  # a second start reads the cache: nothing encoded
    assert encoded == [n]
    # the test split, opening on the failures view; an explicit --host
    visualize.main(base + ["--failures", "--host", "127.0.0.2"])
    (host, port), page = seen[-1]
    assert host == "127.0.0.2" and page.start_view == "failures" and page.test is not None
    assert f"http://127.0.0.2:{port}/" in capsys.readouterr().out
    # clear messages
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="contains no images"):
        visualize.main(base + ["--gallery", str(tmp_path / "empty")])
    for extra, msg in ((["--query", "a man"], "takes no --query"), (["--gallery", str(folder), "--failures"],
                                                                   "drop --gallery")):
        with pytest.raises(SystemExit):
            visualize.main(base + extra)
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        visualize.main(["--config_file", str(run_dir), "--port", "8000"])
    assert "--host / --port go with --serve" in capsys.readouterr().err


def test_port_in_use_is_a_clear_error(retriever, split, tmp_path, live):
    page = S.SearchPage.for_folder(retriever, make_photo_folder(tmp_path / "photos", split), progress=False)
    srv = live(page)
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{srv.port}.*another --port"):
        S.make_server(page, "127.0.0.1", srv.port)


# ------------------------------------------------------------------------------------------------ in a real browser
CHROMIUM_INSTALL = ("apt-get install -y chromium (Debian/Ubuntu) and pip install -r requirements.txt (playwright); "
                    "bash .ci/run does both")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path():
    """The system Chromium (IRRA_CHROMIUM, else chromium / chromium-browser on PATH), or None."""
    for p in (os.environ.get("IRRA_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if p and os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium driven by Playwright (no browser download); skipped, naming the install, without."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"browser test: the playwright package is missing; {CHROMIUM_INSTALL}")
    exe = chromium_path()
    if exe is None:
        pytest.skip(f"browser test: no chromium executable found; {CHROMIUM_INSTALL}")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def expect(locator):
    """Playwright's expect, waiting up to 30 s (the default 5 s is short on a loaded CI machine)."""
    from playwright.sync_api import expect as _expect
    _expect.set_options(timeout=30_000)
    return _expect(locator)


def open_page(browser, srv):
    """A new tab on the server, recording every request it makes and every console error."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = ctx.new_page()
    tab.set_default_timeout(30_000)
    requests, errors = [], []
    tab.on("request", lambda r: requests.append(r.url))
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(srv.url)
    expect(tab.locator("#about")).to_contain_text("images of")
    return ctx, tab, requests, errors


def wait_results(tab, n):
    """Waits with Playwright's expect (the page's CSP forbids the eval that wait_for_function with a string needs)."""
    expect(tab.locator("#status")).to_have_text(re.compile(r"^top \d+ of "))
    expect(tab.locator("#results .result")).to_have_count(n)


def test_browser_search_folder(browser, retriever, split, tmp_path, live):
    folder = make_photo_folder(tmp_path / "photos", split, link=False)  # symlinks: test_folder_page_serves_only...
    page = S.SearchPage.for_folder(retriever, folder, progress=False)
    srv = live(page)
    n = len(page.gallery)
    ctx, tab, requests, errors = open_page(browser, srv)
    text = QUERIES[1]
    tab.locator("#query").press_sequentially(text, delay=15)  # typed key by key
    wait_results(tab, min(10, n))
    _, idx = retriever.search(text, page.gallery, 10)
    assert tab.locator('#results .result[data-rank="1"]').get_attribute("data-name") == \
        Path(page.gallery.paths[idx[0]]).name
    assert tab.locator('#results .result[data-rank="1"] .name').inner_text() == Path(page.gallery.paths[idx[0]]).name
    searches = [u for u in requests if "/api/search" in u]
    assert 1 <= len(searches) < len(text) // 3, "typing is debounced: far fewer requests than keystrokes"
    # k slider
    tab.locator("#k").fill("3")
    wait_results(tab, 3)
    assert [int(x) for x in tab.locator("#results .result").evaluate_all("es => es.map(e => e.dataset.index)")] == \
        idx[:3].tolist()
    # click a result: the image, large
    tab.locator('#results .result[data-rank="2"]').click()
    expect(tab.locator("#viewer")).to_be_visible()
    assert tab.locator("#viewer-img").evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    assert tab.locator("#viewer-img").get_attribute("src") == f"/image/{int(idx[1])}"
    box = tab.locator("#viewer-img").bounding_box()
    assert box["height"] > 400  # shown large (the tiles are 256 px high)
    tab.keyboard.press("Escape")
    assert tab.locator("#viewer").is_hidden()
    # an empty box: a message, no results
    tab.locator("#query").fill("")
    expect(tab.locator("#status")).to_have_text("type a sentence describing the person")
    assert tab.locator("#results .result").count() == 0
    assert errors == [], errors
    # everything came from this server: no fonts, scripts or analytics from anywhere else
    assert requests and all(u.startswith(srv.url) for u in requests), [u for u in requests if
                                                                       not u.startswith(srv.url)]
    # requests for paths outside the gallery are refused
    statuses = tab.evaluate("""async (paths) => {
        const out = [];
        for (const p of paths) out.push((await fetch(p)).status);
        return out; }""", ["/image/%2e%2e%2f%2e%2e%2fsecret.png", "/image/../../secret.png", f"/image/{n}",
                           f"/image/{tmp_path}/secret.png", "/static/../search/server.py", "/image/0"])
    assert statuses == [404, 404, 404, 404, 404, 200]
    ctx.close()


def test_browser_test_split_failures_view(browser, retriever, split, live):
    page = S.SearchPage.for_test_split(retriever, split, progress=False)
    srv = live(page)
    ctx, tab, requests, errors = open_page(browser, srv)
    m = page.info()["metrics"]
    assert f"R1 {m['R1']:.2f}" in tab.locator("#metrics").inner_text()
    assert f"mAP {m['mAP']:.2f}" in tab.locator("#metrics").inner_text()
    fails = page.failures()
    tab.locator("#show-failures").click()
    expect(tab.locator("#failure-list li")).to_have_count(len(fails))
    tab.locator("#failure-list li").first.click()
    wait_results(tab, 10)
    first = fails[0]
    assert tab.locator("#query").input_value() == first["caption"]
    assert "test query %d" % first["index"] in tab.locator("#truth-about").inner_text()
    classes = tab.locator("#results .result").evaluate_all("es => es.map(e => e.className)")
    res = page.search(test_query=first["index"], k=10)["results"]
    assert classes == ["result " + ("match" if r["match"] else "mismatch") for r in res]
    assert classes[0] == "result mismatch"  # a failure: its top-1 is another identity
    gt = tab.locator("#truth-images .result.gt")
    assert gt.count() == split["image_pids"].count(first["pid"])
    assert errors == [] and all(u.startswith(srv.url) for u in requests)
    ctx.close()


def test_test_split_metrics_with_msd(run_dir, retriever, split):
    """--metrics mSD (or UFine6926): the page's metrics carry mSD and mSD_rank_order, over chunks of captions."""
    from benchmarks.reference import msd_rank_naive

    page = S.SearchPage.for_test_split(retriever, split, progress=False)
    assert "mSD" not in page.info()["metrics"]  # not asked
    test = S.rank_test_split(retriever, page.gallery, split["captions"], split["caption_pids"], split["image_pids"],
                             chunk=7, metrics=("mSD",))
    sim = independent_similarity(run_dir, split)
    q_pids, g_pids = torch.tensor(split["caption_pids"]), torch.tensor(split["image_pids"])
    assert test.metrics["mSD"] == pytest.approx(float(msd_rank_naive(sim, q_pids, g_pids)[1]), abs=1e-3)
    ref = float(msd_rank_naive(sim, q_pids, g_pids, rank_order=True)[1])
    assert test.metrics["mSD_rank_order"] == pytest.approx(ref, abs=1e-3)

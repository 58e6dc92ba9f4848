"""A search page in the browser for a trained run: type a sentence, see the top-k people of a gallery.

Started by ``visualize.py --serve`` (see README, "Searching in the browser"); from Python::

    r = Retriever.from_run("logs/SynthPEDES/<run>")
    page = SearchPage.for_folder(r, "my_photos/")          # or SearchPage.for_test_split(r, load_test_split(r.args))
    server = make_server(page, "127.0.0.1", 7860)
    server.serve_forever()

The gallery is encoded once (``Retriever.encode_gallery``'s per-file cache next to the run; on the test split the
captions too, ``Retriever.encode_captions``) and the model is loaded once; a query costs one text encoding and one
ranking, both done by ``Retriever.search`` (``search/index.py``: exact, or an int8 scan re-scored exactly for large
galleries), so a run whose Retriever scores differently is ranked with its own score. Queries run one at a time on
one thread (``guard.ModelGate``); the HTTP server answers each tab in its own thread.

What is served, and nothing else: the page (three files of ``search/static/``, read at start), ``/api/info``,
``/api/search``, ``/api/failures`` and ``/image/<i>``, the ``i``-th image of the gallery list built at start. An image
is never looked up by a path the client sends, so ``..``, absolute paths and other files are refused; for a folder
gallery the file must also resolve inside the folder (a symlink out of it is refused with 403). The page loads only
from this server (Content-Security-Policy ``default-src 'none'`` plus 'self' for its script, style, images and
requests): no analytics, fonts or scripts from the internet.

Against the web (``search/guard.py``): only Host headers naming this server are answered (DNS rebinding), a
non-loopback address needs an access token, a request must arrive within ``--request_timeout``, at most
``--max_connections`` are answered at once, images over ``--max_image_mb`` are not served, ``HEAD /api/search`` runs
no search and a query waits at most ``--model_timeout`` for the model.

Standard library HTTP (``http.server.ThreadingHTTPServer``) and a hand-written page instead of Gradio: see README.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

import torch

from search import guard as G
from search.retrieval import Gallery, Retriever
from search.split_queries import encode_test_captions, encode_test_gallery
from utils.choices import eval_metrics
from utils.metrics import rank
from utils.msd import MSDAccumulator

logger = logging.getLogger("IRRA.search")

STATIC_DIR = Path(__file__).resolve().with_name("static")
# URL path -> (file in STATIC_DIR, content type): the whole front end.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_TOPK = 10
MAX_TOPK = 100          # the k slider's upper end (capped at the gallery size)
# Longest query accepted, in characters. The Retriever then cuts the sentence to the run's text_length tokens (as in
# training) and the page shows the kept part; this bound only keeps a pasted book from tying up the tokenizer.
MAX_QUERY_CHARS = 2000
METRIC_CHUNK = 256      # test captions ranked at once when computing R1/mAP at start
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class QueryError(ValueError):
    """A bad request, answered with its message and an HTTP status (400 unless said)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


@dataclass
class TestQueries:
    """The test split's captions ranked against the test gallery once, at start."""

    captions: list[str]
    pids: list[int]           # identity of each caption
    gallery_pids: list[int]   # identity of each gallery image (gallery order)
    top1: list[int]           # gallery index ranked first for each caption
    metrics: dict             # R1, R5, R10 (as far as the gallery size allows), mAP, mINP (mSD...) in percent

    def failures(self) -> list[int]:
        """Captions whose top-1 image has another identity (what ``visualize.py --failures`` draws)."""
        return [q for q, (pid, j) in enumerate(zip(self.pids, self.top1)) if self.gallery_pids[j] != pid]


def rank_test_split(retriever: Retriever, gallery: Gallery, captions: Sequence[str], caption_pids: Sequence[int],
                    gallery_pids: Sequence[int], chunk: int = METRIC_CHUNK,
                    caption_embeddings: torch.Tensor | None = None, metrics: Sequence[str] = ()) -> TestQueries:
    """R1/R5/R10/mAP/mINP and each caption's top-1, with the Retriever's own score (``Retriever.search``).

    ``caption_embeddings`` [Q, D] (e.g. read from the caption cache) are ranked instead of encoding ``captions``.

    The captions are ranked ``chunk`` at a time over the whole gallery; the metrics are ``utils.metrics.rank``'s
    (the Evaluator's), averaged over chunks weighted by their number of captions (every metric is a mean over queries).
    ``metrics``: the extra metrics (``--metrics``; "mSD" adds ``mSD`` and ``mSD_rank_order``, utils/msd.py).
    """
    msd = MSDAccumulator() if "mSD" in metrics else None
    n = len(gallery)
    g_pids = torch.as_tensor(list(gallery_pids), dtype=torch.long)
    max_rank = min(10, n)
    cmc_sum, map_sum, minp_sum, top1 = torch.zeros(max_rank), 0.0, 0.0, []
    for s in range(0, len(captions), chunk):
        part = list(captions[s:s + chunk])
        query = part if caption_embeddings is None else caption_embeddings[s:s + chunk]  # [c, D]
        scores, idx = retriever.search(query, gallery, topk=n)  # [c, N] each, every image ranked
        sim = torch.empty_like(scores).scatter_(1, idx, scores)  # [c, N] back in gallery order
        q_pids = torch.as_tensor(list(caption_pids[s:s + chunk]), dtype=torch.long)
        cmc, mAP, mINP, _ = rank(sim, q_pids, g_pids, max_rank=max_rank, get_mAP=True, need_indices=False,
                                 observer=msd)
        cmc_sum += cmc * len(part)
        map_sum += float(mAP) * len(part)
        minp_sum += float(mINP) * len(part)
        top1 += idx[:, 0].tolist()
    nq = max(len(captions), 1)
    metrics = {f"R{r}": float(cmc_sum[r - 1]) / nq for r in (1, 5, 10) if r <= max_rank}
    metrics.update(mAP=map_sum / nq, mINP=minp_sum / nq, **(msd.result() if msd is not None else {}))
    return TestQueries(list(captions), [int(p) for p in caption_pids], [int(p) for p in gallery_pids], top1, metrics)


def _display_path(path: str, root: Path | None) -> str:
    """The path shown under a result: relative to the gallery folder, else its last two parts."""
    p = Path(path)
    if root is not None:
        try:
            return str(p.relative_to(root))
        except ValueError:
            pass
    return str(Path(*p.parts[-2:]))


class SearchPage:
    """What the page searches: a retriever, an encoded gallery and, on the test split, the test captions.

    Build it with :meth:`for_folder` or :meth:`for_test_split`. Thread-safe: ``search`` holds a lock around the
    model, the rest only reads.

    Args:
        retriever: the run's :class:`Retriever` (model loaded once, here).
        gallery: the encoded gallery; ``/image/<i>`` serves ``gallery.paths[i]``.
        title: the run's name, shown on the page.
        description: what the gallery is ("the test split of X" / "folder Y"), shown on the page.
        root: for a folder gallery, the folder: an image must resolve inside it to be served.
        test: the ranked test captions (test split only): ground truth, right/wrong marks, R1/mAP, failures.
        start_view: "search" or "failures" (the view the page opens on).
    """

    def __init__(self, retriever: Retriever, gallery: Gallery, title: str, description: str,
                 root: str | os.PathLike | None = None, test: TestQueries | None = None, start_view: str = "search"):
        if start_view not in ("search", "failures"):
            raise ValueError(f"start_view must be 'search' or 'failures', got {start_view!r}")
        if start_view == "failures" and test is None:
            raise ValueError("the failures view needs the test split (a folder of photos has no ground truth)")
        self.retriever = retriever
        self.gallery = gallery
        self.title = title
        self.description = description
        self.root = Path(root).resolve() if root is not None else None
        self.test = test
        self.start_view = start_view
        retriever.index_for(gallery)  # an int8 index of a large gallery is built now, not at the first query
        self.token = secrets.token_hex(8)  # in image ETags: a restarted server on another gallery is not cached
        self._lock = threading.Lock()
        self._caption_index: dict[str, int] = {}
        for q, c in enumerate(test.captions if test is not None else []):
            self._caption_index.setdefault(c.strip(), q)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_folder(cls, retriever: Retriever, folder: str | os.PathLike, progress: bool = True) -> "SearchPage":
        """Every image under ``folder`` (``list_images``), encoded once and cached next to the run."""
        gallery = retriever.encode_folder(folder, progress=progress)
        return cls(retriever, gallery, _run_title(retriever), f"folder {str(folder)!r}", root=folder)

    @classmethod
    def for_test_split(cls, retriever: Retriever, split: dict, progress: bool = True,
                       start_view: str = "search") -> "SearchPage":
        """The run's test images (cached like ``visualize.py``'s), its captions ranked once for R1/mAP/failures."""
        gallery = encode_test_gallery(retriever, split, progress=progress)
        g_pids = [int(split["image_pids"][i]) for i in gallery.indices]
        logger.info("ranking the %d test captions against %d images (R1/mAP, failures)", len(split["captions"]),
                    len(gallery))
        name = retriever.args.dataset_name if retriever.args is not None else "the dataset"
        extra = eval_metrics(retriever.args.metrics, name) if retriever.args is not None else ()
        test = rank_test_split(retriever, gallery, split["captions"], split["caption_pids"], g_pids,
                               caption_embeddings=encode_test_captions(retriever, split), metrics=extra)
        return cls(retriever, gallery, _run_title(retriever), f"the test split of {name}", test=test,
                   start_view=start_view)

    # ------------------------------------------------------------------ answers
    def info(self) -> dict:
        """What the page shows above the results."""
        return {
            "title": self.title,
            "gallery": self.description,
            "gallery_size": len(self.gallery),
            "skipped": len(self.gallery.skipped),
            "mode": "test" if self.test is not None else "folder",
            "metrics": self.test.metrics if self.test is not None else None,
            "num_queries": len(self.test.captions) if self.test is not None else 0,
            "num_failures": len(self.test.failures()) if self.test is not None else 0,
            "default_topk": min(DEFAULT_TOPK, len(self.gallery)),
            "max_topk": min(MAX_TOPK, len(self.gallery)),
            "max_query_chars": MAX_QUERY_CHARS,
            "text_length": getattr(self.retriever.tokenize, "text_length", None),
            "start_view": self.start_view,
        }

    def failures(self) -> list[dict]:
        """The test captions whose top-1 is another identity, in caption order."""
        if self.test is None:
            raise QueryError("there are no failures to show: this page searches a folder of photos, which has no "
                             "ground truth (start it without --gallery to search the run's test split)",
                             HTTPStatus.NOT_FOUND)
        t = self.test
        return [{"index": q, "caption": t.captions[q], "pid": t.pids[q], "top1_pid": t.gallery_pids[t.top1[q]]}
                for q in t.failures()]

    def parse_topk(self, k: str | int | None) -> int:
        """The requested k as an int in [1, max_topk] (a clear error otherwise)."""
        if k is None or k == "":
            return min(DEFAULT_TOPK, len(self.gallery))
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise QueryError(f"k must be a whole number, got {k!r}") from None
        top = min(MAX_TOPK, len(self.gallery))
        if not 1 <= k <= top:
            raise QueryError(f"k must be between 1 and {top} (the gallery has {len(self.gallery)} images), got {k}")
        return k

    def search(self, text: str | None = None, k: str | int | None = None, test_query: str | int | None = None
               ) -> dict:
        """Rank the gallery for a sentence (or for test caption ``test_query``) and describe the top-k.

        Raises QueryError with a message for the page: empty query, query over MAX_QUERY_CHARS, bad k or index.
        """
        topk = self.parse_topk(k)
        truth = None
        if test_query is not None and test_query != "":
            if self.test is None:
                raise QueryError("test_query is only known on the test split (this page searches a folder)")
            try:
                truth = int(test_query)
            except (TypeError, ValueError):
                raise QueryError(f"test_query must be a caption index, got {test_query!r}") from None
            if not 0 <= truth < len(self.test.captions):
                raise QueryError(f"test_query {truth} out of range: the test split has {len(self.test.captions)} "
                                 f"captions (valid 0..{len(self.test.captions) - 1})")
            text = self.test.captions[truth]
        if text is None or not str(text).strip():
            raise QueryError("the query is empty: type a sentence describing the person")
        text = str(text)
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f"the query is {len(text)} characters long; at most {MAX_QUERY_CHARS} are accepted "
                             f"(the model reads only the first {self.info()['text_length']} tokens anyway)",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if truth is None:
            truth = self._caption_index.get(text.strip())
        with self._lock:  # one query at a time through the model
            start = time.perf_counter()
            try:
                tokenized = self.retriever.tokenize(text)
                scores, idx = self.retriever.search(text, self.gallery, topk)  # [k] each
            except ValueError as e:  # e.g. nothing left once cleaned ("&nbsp;")
                raise QueryError(str(e)) from None
            ms = (time.perf_counter() - start) * 1000
        results = []
        for r, (s, j) in enumerate(zip(scores.tolist(), idx.tolist()), start=1):
            res = {"rank": r, "score": s, "index": j, "name": Path(self.gallery.paths[j]).name,
                   "path": _display_path(self.gallery.paths[j], self.root)}
            if self.test is not None:
                res["pid"] = self.test.gallery_pids[j]
                if truth is not None:
                    res["match"] = res["pid"] == self.test.pids[truth]
            results.append(res)
        out = {"query": text, "kept_text": tokenized.text, "cut": tokenized.was_cut,
               "num_tokens": tokenized.num_tokens, "k": topk, "gallery_size": len(self.gallery),
               "ms": round(ms, 1), "results": results, "truth": None}
        if truth is not None:
            t, pid = self.test, self.test.pids[truth]
            out["truth"] = {"index": truth, "caption": t.captions[truth], "pid": pid,
                            "images": [j for j, p in enumerate(t.gallery_pids) if p == pid],
                            "top1_correct": t.gallery_pids[t.top1[truth]] == pid}
        return out

    def image_file(self, index: str) -> tuple[Path, str]:
        """(file, content type) of gallery image ``index`` (decimal digits only); QueryError 404/403 otherwise."""
        if not (index.isascii() and index.isdecimal()) or int(index) >= len(self.gallery):
            raise QueryError(f"no gallery image {index!r}: images are served by index, 0..{len(self.gallery) - 1}",
                             HTTPStatus.NOT_FOUND)
        path = Path(self.gallery.paths[int(index)])
        real = path.resolve()
        if self.root is not None and not real.is_relative_to(self.root):
            raise QueryError(f"gallery image {index} resolves outside the gallery folder: not served",
                             HTTPStatus.FORBIDDEN)
        ctype = IMAGE_TYPES.get(real.suffix.lower())
        if ctype is None or not real.is_file():
            raise QueryError(f"gallery image {index} is not a readable image file", HTTPStatus.NOT_FOUND)
        return real, ctype


def _run_title(retriever: Retriever) -> str:
    return retriever.run_dir.name if retriever.run_dir is not None else "IRRA"


def _read_static() -> dict[str, tuple[bytes, str]]:
    out = {}
    for url, (name, ctype) in STATIC_FILES.items():
        f = STATIC_DIR / name
        try:
            out[url] = (f.read_bytes(), ctype)
        except OSError as e:
            raise FileNotFoundError(f"the search page's file {str(f)!r} cannot be read ({e}): is the checkout "
                                    f"complete?") from e
    return out


class _Handler(G.CheckedHandler):
    """Routes of the page (the guards are ``CheckedHandler``'s); ``page`` and ``static`` are set on a subclass by
    :func:`make_server`, ``timeout`` too (``--request_timeout``)."""

    server_version = "IRRA-search"
    page: SearchPage
    static: dict[str, tuple[bytes, str]]
    server: "_Server"

    def _head(self, status: int, ctype: str, length: int | None, cache: str = "no-store", etag: str | None = None,
              extra: dict | None = None) -> None:
        self.connection.settimeout(self.timeout)  # each write of the answer gets the whole timeout
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if etag is not None:
            self.send_header("ETag", etag)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store", etag: str | None = None,
              extra: dict | None = None) -> None:
        self._head(status, ctype, len(body), cache, etag, extra)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = HTTPStatus.OK, extra: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", extra=extra)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        arg = lambda name: query.get(name, [None])[-1]  # noqa: E731
        try:
            if not self._admitted():
                return
            if url.path in self.static:
                body, ctype = self.static[url.path]
                self._send(HTTPStatus.OK, body, ctype, cache="no-cache")
            elif url.path == "/api/info":
                self._json(self.page.info())
            elif url.path == "/api/search" and self.command == "HEAD":
                self._head(HTTPStatus.OK, "application/json; charset=utf-8", None)  # no search for a HEAD
            elif url.path == "/api/search":
                self._json(self.server.gate.call(self.page.search, arg("q"), arg("k"), arg("test_query")))
            elif url.path == "/api/failures":
                self._json(self.page.failures())
            elif url.path == "/favicon.ico":
                self.send_response(HTTPStatus.NO_CONTENT)  # no icon (a 404 would be a console error in every tab)
                self.end_headers()
            elif url.path.startswith("/image/"):
                self._image(url.path[len("/image/"):])
            else:
                raise QueryError(f"not found: {url.path!r} (this server answers /, /api/info, /api/search, "
                                 f"/api/failures and /image/<index>)", HTTPStatus.NOT_FOUND)
        except QueryError as e:
            self._json({"error": str(e)}, e.status)
        except G.ModelTimeout as e:
            self._json({"error": str(e), "timeout": True}, HTTPStatus.SERVICE_UNAVAILABLE, {"Retry-After": "5"})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the tab went away (a newer keystroke aborted it) or stopped reading
        except Exception:  # noqa: BLE001 (a request must not kill the server)
            logger.exception("search page: error answering %s", G.redact(self.path))
            self._json({"error": "internal error: see the server's log"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    do_HEAD = do_GET

    def _image(self, index: str) -> None:
        """Gallery image ``index``, streamed (never read whole), refused over the size cap."""
        path, ctype = self.page.image_file(index)
        etag = f'"{self.page.token}-{index}"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            cap = self.server.max_image_bytes
            if size > cap:
                raise QueryError(f"gallery image {index} is {size / 2**20:.1f} MB, over the page's cap of "
                                 f"{cap / 2**20:g} MB (--max_image_mb): not served",
                                 HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            self._head(HTTPStatus.OK, ctype, size, cache="no-cache", etag=etag)
            if self.command != "HEAD":
                left = size
                while left > 0:  # at most the size announced, even if the file grew meanwhile
                    chunk = f.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def _refuse(self) -> None:
        if self._admitted():
            self._json({"error": f"{self.command} is not supported: the page only reads (GET)"},
                       HTTPStatus.METHOD_NOT_ALLOWED)

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

class _Server(G.CappedThreadingServer):
    """One thread per connection (at most ``max_connections``, see guard.py), the page's guards as attributes."""

    daemon_threads = True  # a tab left open does not keep the process alive after Ctrl+C
    request_queue_size = 64  # connections waiting to be accepted (several tabs, each fetching up to 100 images)
    host_check: G.HostCheck
    access_token: G.AccessToken | None
    gate: G.ModelGate | None = None  # set once bound (a failed bind closes the server before)
    max_image_bytes: int

    def server_close(self) -> None:
        super().server_close()
        if self.gate is not None:
            self.gate.close()


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(page: SearchPage, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                allowed_hosts: Sequence[str] = (), token: bool | None = None,
                request_timeout: float = G.DEFAULT_REQUEST_TIMEOUT, max_connections: int = G.DEFAULT_MAX_CONNECTIONS,
                max_image_mb: float = G.DEFAULT_MAX_IMAGE_MB, model_timeout: float = G.DEFAULT_MODEL_TIMEOUT
                ) -> ThreadingHTTPServer:
    """An HTTP server of ``page`` bound to (host, port), not yet serving (call ``serve_forever``); port 0 = any free.

    What it defends against, and the options (visualize.py's ``--serve`` options of the same names), are in
    ``search/guard.py``. ``token``: None = required when ``host`` is not a loopback address, True = always, False =
    never (``--no_token``, warned about off loopback). ValueError naming the option for a bad value.
    """
    G.check_limits(request_timeout, max_connections, max_image_mb, model_timeout)
    host_check = G.HostCheck(host, allowed_hosts)
    handler = type("Handler", (_Handler,), {"page": page, "static": _read_static(), "timeout": request_timeout})
    cls = _Server6 if ":" in host else _Server
    try:
        server = cls((host, port), handler, max_connections=max_connections)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): pass another --port (or --port 0 for any "
                      f"free one)") from e
    server.host_check = host_check
    server.max_image_bytes = int(max_image_mb * 2**20)
    server.gate = G.ModelGate(model_timeout)
    local = G.is_loopback(host)
    server.access_token = G.AccessToken(server.server_address[1]) if (token is None and not local) or token else None
    if not local and server.access_token is None:
        logger.warning("the search page listens on %s without an access token (--no_token): anyone who can reach "
                       "this machine on port %d can use it", host, server.server_address[1])
    elif not local:
        logger.info("the search page listens on %s: it needs the access token in the printed address", host)
    return server


def page_url(server: ThreadingHTTPServer) -> str:
    """The address to open in a browser (with ``?token=...`` when the page has an access token)."""
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    return url + f"?token={server.access_token.token}" if server.access_token is not None else url

r"""Draw text-to-image retrieval results of a trained run (search/retrieval.py, search/split_queries.py).

Test queries of the run's dataset (green frame = right identity, red = wrong, blue = ground truth):
    python visualize.py --config_file logs/<dataset>/<run>/configs.yaml [--query_index 0 7 ...] [--num_queries 5]
        [--failures] [--topk 10] [--out DIR]
Free-text search over any folder of images (embeddings cached next to the run):
    python visualize.py --config_file logs/<dataset>/<run>/configs.yaml --gallery my_photos/ \
        --query "a man in a blue jacket with a black backpack" [--query "..."]
Grids never overwrite a file: an existing name gets a _1, _2... suffix.
A search page in the browser (search/server.py) over the test split, or over a folder with --gallery:
    python visualize.py --config_file logs/<dataset>/<run>/configs.yaml --serve [--gallery my_photos/] \
        [--failures] [--host 127.0.0.1] [--port 7860] [--allowed_host NAME] [--no_token] [--request_timeout S]
        [--max_connections N] [--max_image_mb MB] [--model_timeout S]
"""
import argparse
import logging
import os
from pathlib import Path

from search import guard as G
from search import split_queries as T
from search.grid import draw_search_grid, save_new_png, slug, tile_size_for
from search.retrieval import Retriever
from utils.cli import run_main
from utils.iotools import make_output_dir
from utils.run_dir import VIS_DIR, check_writable


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", required=True, help="the run's configs.yaml (or the run directory)")
    p.add_argument("--checkpoint", default=None, help="weights file (default: best.pth of the run)")
    p.add_argument("--query", action="append", default=[], help="free-text query; repeatable")
    p.add_argument("--gallery", default=None, help="folder of .jpg/.png searched by --query (default: test images)")
    p.add_argument("--query_index", type=int, nargs="+", default=None, help="test query indices to draw")
    p.add_argument("--num_queries", type=int, default=5, help="test queries drawn when no --query_index")
    p.add_argument("--failures", action="store_true", help="draw test queries whose top-1 is wrong")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--out", default=None, help="output folder (default: <run>/vis)")
    p.add_argument("--device", default="auto", help="auto | cpu | an accelerator[:N]")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    p.add_argument("--feature_set", default=None,
                   help="the method's feature set ranked (default: the method's own; methods/<name>/method.py: "
                        "feature_sets)")
    p.add_argument("--serve", action="store_true", help="start the search page in the browser instead of drawing")
    p.add_argument("--host", default=None, help="--serve: address to listen on (default 127.0.0.1, this machine "
                   "only; another address makes the page reachable from the network)")
    p.add_argument("--port", type=int, default=None, help="--serve: port (default 7860; 0 = any free port)")
    p.add_argument("--allowed_host", action="append", default=[], help="--serve: another name the page may be "
                   "reached by (the Host header; repeatable; .example.org also allows its subdomains). Others get 403")
    p.add_argument("--no_token", action="store_true", help="--serve: no access token on a non-loopback --host "
                   "(anyone who reaches the port can use the page; warned)")
    p.add_argument("--request_timeout", type=float, default=G.DEFAULT_REQUEST_TIMEOUT,
                   help="--serve: seconds a client has to send its whole request (default %(default)g)")
    p.add_argument("--max_connections", type=int, default=G.DEFAULT_MAX_CONNECTIONS,
                   help="--serve: connections answered at once; more get 503 (default %(default)d)")
    p.add_argument("--max_image_mb", type=float, default=G.DEFAULT_MAX_IMAGE_MB,
                   help="--serve: gallery images larger than this are not served (413; default %(default)g)")
    p.add_argument("--model_timeout", type=float, default=G.DEFAULT_MODEL_TIMEOUT,
                   help="--serve: seconds a query waits for the model before the page says it timed out "
                        "(default %(default)g)")
    a = p.parse_args(argv)
    if a.topk < 1 or a.num_queries < 1:
        p.error("--topk and --num_queries must be >= 1")
    if any(not q.strip() for q in a.query):
        p.error(f"--query must be a sentence describing the person, got {[q for q in a.query if not q.strip()]}")
    if a.query and (a.failures or a.query_index):
        p.error("--failures / --query_index select test queries; they cannot be combined with --query")
    if a.serve and (a.query or a.query_index):
        p.error("--serve starts a page where queries are typed: it takes no --query / --query_index")
    if a.serve and a.gallery and a.failures:
        p.error("--failures needs the test split's ground truth: drop --gallery to serve the test split")
    if not a.serve and (a.host is not None or a.port is not None):
        p.error("--host / --port go with --serve")
    serve_only = {"--allowed_host": a.allowed_host != [], "--no_token": a.no_token,
                  "--request_timeout": a.request_timeout != G.DEFAULT_REQUEST_TIMEOUT,
                  "--max_connections": a.max_connections != G.DEFAULT_MAX_CONNECTIONS,
                  "--max_image_mb": a.max_image_mb != G.DEFAULT_MAX_IMAGE_MB,
                  "--model_timeout": a.model_timeout != G.DEFAULT_MODEL_TIMEOUT}
    if not a.serve and any(serve_only.values()):
        p.error(f"{', '.join(k for k, v in serve_only.items() if v)} go with --serve")
    try:
        G.check_limits(a.request_timeout, a.max_connections, a.max_image_mb, a.model_timeout)
        a.allowed_host = [G.check_allowed_host(h) for h in a.allowed_host]
    except ValueError as e:
        p.error(str(e))
    if a.gallery and not a.query and not a.serve:
        p.error("--gallery is searched with --query \"a sentence\" (or in the browser with --serve)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.serve:
        serve(a)
        return []

    r = Retriever.from_run(a.config_file, a.checkpoint, a.device, a.batch_size, a.num_workers, a.feature_set)
    out = Path(a.out) if a.out else r.run_dir / VIS_DIR
    option = "--out" if a.out else f"the run's {VIS_DIR}/ folder"
    make_output_dir(str(out), option)  # checked before the (long) encoding: the grids must have somewhere to go
    check_writable(str(out), f"grids ({option})")
    tile, saved = tile_size_for(r.args), []
    if a.query:
        gallery = r.encode_folder(a.gallery) if a.gallery else T.encode_test_gallery(r, T.load_test_split(r.args))
        for i, q in enumerate(a.query):
            scores, idx = r.search(q, gallery, a.topk)
            paths = [gallery.paths[j] for j in idx.tolist()]
            make_output_dir(str(out), option)
            grid = draw_search_grid(r.kept_text(q), paths, scores, tile)  # the header shows what the model saw
            saved.append(save_new_png(grid, out / f"search_{i:02d}_{slug(q)}.png"))
            print(f"\nquery: {q}\n" + "\n".join(f"{k:3d}  {s:7.4f}  {pth}" for k, (s, pth)
                                                in enumerate(zip(scores.tolist(), paths), start=1)))
    else:
        split = T.load_test_split(r.args)
        T.check_query_indices(a.query_index, len(split["captions"]))
        picked = T.pick_queries(T.rank_test_queries(r, split, a.topk), a.query_index, a.num_queries, a.failures)
        if not picked:
            print("no query to draw" + (" (every top-1 is correct)" if a.failures else ""))
        for res in picked:
            make_output_dir(str(out), option)
            saved.append(save_new_png(T.draw_query_grid(res, tile), out / f"query_{res.index:05d}.png"))
    print("\n" + "\n".join(f"saved {s}" for s in saved))
    return saved


def serve(a) -> None:
    """--serve: load the run once, encode (or read from cache) the gallery, answer the page until Ctrl+C."""
    from search.server import DEFAULT_HOST, DEFAULT_PORT, SearchPage, make_server, page_url

    r = Retriever.from_run(a.config_file, a.checkpoint, a.device, a.batch_size, a.num_workers, a.feature_set)
    if a.gallery:
        page = SearchPage.for_folder(r, a.gallery)
    else:
        page = SearchPage.for_test_split(r, T.load_test_split(r.args),
                                         start_view="failures" if a.failures else "search")
    server = make_server(page, a.host or DEFAULT_HOST, DEFAULT_PORT if a.port is None else a.port,
                         allowed_hosts=a.allowed_host, token=False if a.no_token else None,
                         request_timeout=a.request_timeout, max_connections=a.max_connections,
                         max_image_mb=a.max_image_mb, model_timeout=a.model_timeout)
    print(f"\nsearch page of {page.title} over {len(page.gallery)} images of {page.description}: {page_url(server)}"
          f"\n(Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    run_main(main, prog="visualize.py")

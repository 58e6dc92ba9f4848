"""Query time of the browser search page (search/server.py) over a cached gallery of 10,000 images.

What is timed is what a keystroke costs once the debounce fires: an HTTP GET of ``/api/search?q=...&k=...`` from a
client on this machine (a new connection per query, as the page's fetch on HTTP/1.0), answered by the live server:
one text encoding by the real model, one [1, D] x [D, N] product and top-k, the JSON of the results.

The model is the real IRRA architecture at full size (``scratch:ViT-B/16``: 12-layer 512-wide text transformer,
77 tokens; random weights: no CLIP file here, and the time does not depend on the values). The gallery embeddings
are synthesized (N random unit vectors of the model's width): that is what a cached gallery is once loaded, and
encoding 10,000 images is the one-time cost the cache removes. Images are not requested (the browser then fetches
the k thumbnails by index, static files).

Usage: python -m benchmarks.bench_search_page [--gallery_size 10000] [--queries 40] [--topk 10] [--threads N]
Prints medians and the 90th percentile in ms: the HTTP round trip, and the server's own time (encode + rank).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from urllib.parse import quote

import torch
import torch.nn.functional as F

from datasets.build import build_transforms
from model.build import build_model
from search.retrieval import Gallery, QueryTokenizer, Retriever
from search.server import SearchPage, make_server
from utils.options import get_args
from utils.simple_tokenizer import get_tokenizer
from datasets.cuhkpedes import TRAIN_IDS  # CUHK-PEDES's identities: the full-size id head

# Typical CUHK-PEDES-like sentences (15-40 tokens); each is asked in turn.
SENTENCES = [
    "a man in a blue jacket with a black backpack",
    "a woman with long blonde hair wearing a red skirt and white shoes",
    "The man is wearing a grey hoodie, dark jeans and black sneakers. He carries a brown bag on his left shoulder.",
    "a young girl in a pink dress holding an umbrella",
    "A woman wearing a white blouse, black trousers and sunglasses is walking with a yellow handbag.",
    "an older man with glasses, a beige coat and brown leather shoes",
    "person in a green t-shirt and khaki shorts carrying a white plastic bag",
    "The lady has short black hair and wears a long purple coat over blue jeans and black boots.",
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery_size", type=int, default=10000)
    p.add_argument("--queries", type=int, default=40, help="timed queries (after 5 warm-up ones)")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--arch", default="scratch:ViT-B/16", help="a scratch: architecture (random weights)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)

    t0 = time.perf_counter()
    args = get_args(["--pretrain_choice", opt.arch, "--device", "cpu"])
    torch.manual_seed(0)
    model = build_model(args, num_classes=TRAIN_IDS, device=torch.device("cpu")).eval()
    build_s = time.perf_counter() - t0
    retriever = Retriever(model, build_transforms(img_size=tuple(args.img_size), is_train=False),
                          QueryTokenizer(get_tokenizer(), int(args.text_length)), torch.device("cpu"))
    dim = model.encode_text(torch.ones(1, 3, dtype=torch.long)).shape[-1]
    g = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(opt.gallery_size, dim, generator=g), dim=-1)  # [N, D], a loaded cache
    with tempfile.TemporaryDirectory() as root:
        paths = [os.path.join(root, f"{i:05d}.jpg") for i in range(opt.gallery_size)]
        page = SearchPage(retriever, Gallery(paths, embeddings, list(range(opt.gallery_size))), "bench",
                          f"{opt.gallery_size} synthesized embeddings", root=root)
        server = make_server(page, "127.0.0.1", 0)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def ask(text: str) -> tuple[float, float]:
            start = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("GET", f"/api/search?q={quote(text)}&k={opt.topk}")
            r = c.getresponse()
            body = json.loads(r.read())
            c.close()
            ms = (time.perf_counter() - start) * 1000
            if r.status != 200 or len(body["results"]) != opt.topk:
                raise RuntimeError(f"unexpected answer {r.status}: {body}")
            return ms, body["ms"]

        for i in range(5):
            ask(SENTENCES[i % len(SENTENCES)])
        trips, server_ms = [], []
        for i in range(opt.queries):
            a, b = ask(SENTENCES[i % len(SENTENCES)])
            trips.append(a)
            server_ms.append(b)
        # the parts, without HTTP: in a thread of their own, as the server answers each request (on a loaded machine
        # torch's intra-op threads in the main thread can be many times slower than in a fresh thread)
        enc, rank = [], []

        def parts():
            for i in range(opt.queries):
                s = time.perf_counter()
                q = retriever.encode_texts([SENTENCES[i % len(SENTENCES)]])
                m = time.perf_counter()
                (q @ embeddings.T).topk(opt.topk, dim=1)
                e = time.perf_counter()
                enc.append((m - s) * 1000)
                rank.append((e - m) * 1000)

        worker = threading.Thread(target=parts)
        worker.start()
        worker.join()
        server.shutdown()
        server.server_close()

    def p90(x):
        return sorted(x)[int(round(0.9 * (len(x) - 1)))]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average "
          f"{os.getloadavg()[0]:.1f}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; model {opt.arch} (random weights, built in "
          f"{build_s:.1f} s), text_length {args.text_length}, D {dim}")
    print(f"gallery {opt.gallery_size} embeddings, k {opt.topk}, {opt.queries} timed queries "
          f"(sentences of {min(len(s.split()) for s in SENTENCES)}-{max(len(s.split()) for s in SENTENCES)} words)")
    print(f"HTTP round trip (what the page waits for): median {statistics.median(trips):.1f} ms, "
          f"p90 {p90(trips):.1f} ms, min {min(trips):.1f} ms")
    print(f"  server time (encode + rank): median {statistics.median(server_ms):.1f} ms")
    print(f"  text encoding alone: median {statistics.median(enc):.1f} ms; product + top-k alone: median "
          f"{statistics.median(rank):.2f} ms")
    verdict = "under" if statistics.median(trips) < 200 else "OVER"
    print(f"target: under 200 ms -> median {statistics.median(trips):.1f} ms is {verdict}")


if __name__ == "__main__":
    main()

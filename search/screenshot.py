"""Screenshot of the search page (how docs/search_page.png is made): a live server, headless system Chromium.

    python -m search.screenshot --config_file logs/SynthPEDES/<run>/configs.yaml --out docs/search_page.png \
        [--gallery DIR] [--query "a sentence" | --test_query N] [--k 8]

Without --query / --test_query on the test split, the sentence typed is the first test caption whose top-1 is right
and whose top-k also holds other identities (green and red frames both show). Needs playwright and chromium (see
README, "Searching in the browser").
"""
import argparse
import io
import logging
import threading

from PIL import Image

from search import split_queries as T
from search.retrieval import Retriever
from search.server import SearchPage, make_server, page_url


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", required=True)
    p.add_argument("--gallery", default=None)
    p.add_argument("--query", default=None)
    p.add_argument("--test_query", type=int, default=None)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=820)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from playwright.sync_api import expect, sync_playwright

    r = Retriever.from_run(a.config_file, device="cpu")
    page = SearchPage.for_folder(r, a.gallery) if a.gallery else SearchPage.for_test_split(r, T.load_test_split(r.args))
    text = a.query
    if text is None and page.test is not None:
        t = page.test
        i = a.test_query
        if i is None:
            for q in range(len(t.captions)):
                res = page.search(test_query=q, k=a.k)
                if res["truth"]["top1_correct"] and not all(x["match"] for x in res["results"]):
                    i = q
                    break
        text = t.captions[i if i is not None else 0]
    if text is None:
        p.error("--query is needed for a folder gallery")
    server = make_server(page, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=a.chromium,
                               args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                     "--disable-component-update", "--disable-sync", "--no-first-run"])
        tab = b.new_page(viewport={"width": a.width, "height": a.height})
        tab.goto(page_url(server))
        expect(tab.locator("#about")).to_contain_text("images of")
        tab.locator("#k").fill(str(a.k))
        tab.locator("#query").fill(text)
        expect(tab.locator("#results .result")).to_have_count(a.k, timeout=60_000)
        tab.locator("#results img").evaluate_all("imgs => Promise.all(imgs.map(i => i.decode()))")  # all drawn
        png = tab.screenshot()
        b.close()
    # 256 colours, no dithering: a third of the size, no visible change
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT,
                                                        dither=Image.Dither.NONE).save(a.out, optimize=True)
    server.shutdown()
    print(f"saved {a.out} (query: {text!r})")


if __name__ == "__main__":
    main()

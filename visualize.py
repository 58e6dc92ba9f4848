r"""Draw text-to-image retrieval results of a trained run (processor/retrieval.py, processor/test_queries.py).

Test queries of the run's dataset (green frame = right identity, red = wrong, blue = ground truth):
    python visualize.py --config_file logs/<dataset>/<run>/configs.yaml [--query_index 0 7 ...] [--num_queries 5]
        [--failures] [--topk 10] [--out DIR]
Free-text search over any folder of images (embeddings cached next to the run):
    python visualize.py --config_file logs/<dataset>/<run>/configs.yaml --gallery my_photos/ \
        --query "a man in a blue jacket with a black backpack" [--query "..."]
Grids never overwrite a file: an existing name gets a _1, _2... suffix.
"""
import argparse
import logging
import os
from pathlib import Path

from processor import test_queries as T
from processor.retrieval import Retriever
from utils.cli import run_main
from utils.grid import draw_search_grid, save_new_png, slug, tile_size_for
from utils.iotools import check_output_dir, make_output_dir


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
    a = p.parse_args(argv)
    if a.topk < 1 or a.num_queries < 1:
        p.error("--topk and --num_queries must be >= 1")
    if any(not q.strip() for q in a.query):
        p.error(f"--query must be a sentence describing the person, got {[q for q in a.query if not q.strip()]}")
    if a.query and (a.failures or a.query_index):
        p.error("--failures / --query_index select test queries; they cannot be combined with --query")
    if a.gallery and not a.query:
        p.error("--gallery is searched with --query \"a sentence\"")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    r = Retriever.from_run(a.config_file, a.checkpoint, a.device, a.batch_size, a.num_workers)
    out = Path(a.out) if a.out else r.run_dir / "vis"
    check_output_dir(str(out), "--out" if a.out else "the run's vis/ folder")  # before minutes of encoding
    tile, saved = tile_size_for(r.args), []
    if a.query:
        gallery = r.encode_folder(a.gallery) if a.gallery else T.encode_test_gallery(r, T.load_test_split(r.args))
        for i, q in enumerate(a.query):
            scores, idx = r.search(q, gallery, a.topk)
            paths = [gallery.paths[j] for j in idx.tolist()]
            make_output_dir(str(out), "--out")
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
            make_output_dir(str(out), "--out")
            saved.append(save_new_png(T.draw_query_grid(res, tile), out / f"query_{res.index:05d}.png"))
    print("\n" + "\n".join(f"saved {s}" for s in saved))
    return saved


if __name__ == "__main__":
    run_main(main, prog="visualize.py")

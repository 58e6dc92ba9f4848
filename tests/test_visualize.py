"""visualize.py end to end on a tiny SynthPEDES run: the real model, configs.yaml, best.pth, dataset registry.

The run directory is built by hand (configs.yaml + best.pth of a from-scratch ViT-Micro), which is what train.py
leaves behind; frame colours are checked against identities ranked independently here.
"""
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import visualize
from datasets import build as dbuild
from model.build import build_model
from search import retrieval as R
from search import split_queries as TQ
from tests.conftest import TINY_RUN, independent_similarity, retrieval_warnings
from search import grid as G
from utils.checkpoint import Checkpointer
from utils.iotools import save_train_configs
from utils.options import get_args
from utils.simple_tokenizer import SimpleTokenizer



def independent_ranking(run, split, topk):
    """Top-k scores and test pids per caption, computed without search/retrieval.py."""
    sim = independent_similarity(run, split)
    scores, idx = sim.topk(topk, dim=1)
    pids = torch.tensor(split["image_pids"])
    return scores, pids[idx]


def frame_colour(img, box):
    x0, y0, x1, y1 = box
    return img.getpixel((x0 + G.FRAME // 2, (y0 + y1) // 2))


def read_grid_colours(png, caption, num_tiles, tile):
    img = Image.open(png).convert("RGB")
    _, size, boxes = G.caption_layout(caption, num_tiles, tile)
    assert img.size == size
    return [frame_colour(img, b) for b in boxes]


def test_test_queries_grid_colours_match_identities(tiny_synth, run_dir, tmp_path):
    split = dbuild.build_dataset("SynthPEDES", root=str(tiny_synth), verbose=False).test
    topk = 4
    out = tmp_path / "vis"
    saved = visualize.main(["--config_file", str(run_dir / "configs.yaml"), "--num_queries", "3", "--topk", str(topk),
                            "--out", str(out), "--device", "cpu", "--num_workers", "0"])
    assert len(saved) == 3 and all(p.is_file() for p in saved)
    scores, topk_pids = independent_ranking(run_dir, split, topk)
    tile = (128, 256)  # img_size 64x32 -> 128 px wide at the run's aspect
    for png in saved:
        q = int(re.search(r"query_(\d+)\.png", png.name).group(1))
        pid = split["caption_pids"][q]
        res = TQ.QueryResult(q, split["captions"][q], pid, None, [], [], [])
        colours = read_grid_colours(png, TQ.query_title(res), topk + 1, tile)
        assert colours[0] == G.GT_COLOR
        want = [G.MATCH_COLOR if p == pid else G.MISMATCH_COLOR for p in topk_pids[q].tolist()]
        assert colours[1:] == want, f"query {q}"
    # same ranking as the library's
    results = TQ.rank_test_queries(R.Retriever.from_run(run_dir, device="cpu"), split, topk, progress=False)
    assert [r.pids for r in results] == topk_pids.tolist()
    assert torch.allclose(torch.tensor([r.scores for r in results]), scores, atol=1e-5)
    # the ground truth drawn first is an image of the query's identity
    assert all(split["image_pids"][split["img_paths"].index(r.gt_path)] == r.pid for r in results)


def test_failures_only_draws_wrong_top1(tiny_synth, run_dir, tmp_path):
    split = dbuild.build_dataset("SynthPEDES", root=str(tiny_synth), verbose=False).test
    _, topk_pids = independent_ranking(run_dir, split, 3)
    wrong = [q for q in range(len(split["captions"])) if topk_pids[q, 0] != split["caption_pids"][q]]
    assert wrong, "the untrained tiny model should miss some queries"
    saved = visualize.main(["--config_file", str(run_dir), "--failures", "--num_queries", "50", "--topk", "3",
                            "--out", str(tmp_path), "--device", "cpu", "--num_workers", "0"])
    assert sorted(int(re.search(r"(\d+)", p.name).group(1)) for p in saved) == wrong
    for png in saved[:3]:
        q = int(re.search(r"(\d+)", png.name).group(1))
        res = TQ.QueryResult(q, split["captions"][q], split["caption_pids"][q], None, [], [], [])
        assert read_grid_colours(png, TQ.query_title(res), 4, (128, 256))[1] == G.MISMATCH_COLOR
    # explicit indices, and a clear error out of range
    saved = visualize.main(["--config_file", str(run_dir / "configs.yaml"), "--query_index", "4", "1", "--topk", "2",
                            "--out", str(tmp_path / "idx"), "--device", "cpu", "--num_workers", "0"])
    assert [p.name for p in saved] == ["query_00004.png", "query_00001.png"]
    with pytest.raises(ValueError, match="out of range"):
        visualize.main(["--config_file", str(run_dir), "--query_index", "999", "--out", str(tmp_path / "bad"),
                        "--device", "cpu", "--num_workers", "0"])


def parse_printed(text):
    """{query: [(score, path), ...]} from visualize's printout."""
    out, cur = {}, None
    for line in text.splitlines():
        if line.startswith("query: "):
            cur = out.setdefault(line[len("query: "):], [])
        elif cur is not None and re.match(r"\s*\d+\s+-?\d\.\d{4}\s+\S", line):
            _, s, p = line.split(maxsplit=2)
            cur.append((float(s), p))
    return out


def test_free_text_search_cache_and_reencode(tiny_synth, run_dir, tmp_path, capsys, monkeypatch):
    split = dbuild.build_dataset("SynthPEDES", root=str(tiny_synth), verbose=False).test
    gallery = tmp_path / "my photos"
    for i, p in enumerate(split["img_paths"][:6]):
        sub = gallery / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, sub / Path(p).name)
    encoded = []
    real = R.Retriever.encode_images
    monkeypatch.setattr(R.Retriever, "encode_images",
                        lambda self, paths, progress=True: encoded.append(list(paths)) or real(self, paths, progress))
    queries = ["a man in a blue jacket with a black backpack", "a woman with long blonde hair in a red skirt"]
    argv = ["--config_file", str(run_dir / "configs.yaml"), "--gallery", str(gallery), "--query", queries[0],
            "--query", queries[1], "--topk", "4", "--out", str(tmp_path / "out"), "--device", "cpu",
            "--num_workers", "0"]
    saved = visualize.main(argv)
    assert len(encoded) == 1 and len(encoded[0]) == 6  # the folder is encoded once for both queries
    printed = parse_printed(capsys.readouterr().out)
    assert list(printed) == queries and len(saved) == 2
    r = R.Retriever.from_run(run_dir, device="cpu")
    for q, rows in printed.items():
        assert len(rows) == 4
        scores = [s for s, _ in rows]
        assert scores == sorted(scores, reverse=True)
        assert all(Path(p).is_file() and Path(p).is_relative_to(gallery) for _, p in rows)
        t = r.encode_texts([q])
        for s, p in rows:  # printed scores are the cosine similarities of those files
            assert s == pytest.approx(float(t[0] @ r.encode_images([p], progress=False).embeddings[0]), abs=2e-4)
    encoded.clear()
    # the grid: neutral frames, one tile per result, readable size
    img = Image.open(saved[0]).convert("RGB")
    _, size, boxes = G.caption_layout(queries[0], 4, (128, 256))
    assert img.size == size and {frame_colour(img, b) for b in boxes} == {G.NEUTRAL_COLOR}
    # second call: cache hit, no image encoded, same results
    visualize.main(argv)
    assert encoded == [] and parse_printed(capsys.readouterr().out) == printed
    assert len(list((run_dir / R.CACHE_DIRNAME).glob("folder_*.pt"))) == 1
    # a new file -> that file alone is encoded (the cache is per file)
    shutil.copy(split["img_paths"][-1], gallery / "new.png")
    visualize.main(argv)
    assert encoded == [[str(gallery / "new.png")]]
    capsys.readouterr()
    # no --gallery: the sentence searches the run's test images
    visualize.main(argv[:2] + ["--query", queries[0], "--topk", "3", "--out", str(tmp_path / "t"), "--device", "cpu",
                               "--num_workers", "0"])
    rows = parse_printed(capsys.readouterr().out)[queries[0]]
    assert len(rows) == 3 and all(p in split["img_paths"] for _, p in rows)


def test_bad_inputs_give_clear_messages(run_dir, tmp_path, capsys):
    base = ["--config_file", str(run_dir), "--query", "a man", "--out", str(tmp_path / "o"), "--device", "cpu",
            "--num_workers", "0"]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"contains no images"):
        visualize.main(base + ["--gallery", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        visualize.main(base + ["--gallery", str(tmp_path / "missing")])
    no_best = tmp_path / "run_without_best"
    no_best.mkdir()
    shutil.copy(run_dir / "configs.yaml", no_best / "configs.yaml")
    with pytest.raises(FileNotFoundError, match=r"best\.pth"):
        visualize.main(["--config_file", str(no_best / "configs.yaml"), "--query", "a man", "--gallery",
                        str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"nope\.pth' \(given with --checkpoint\) not found"):
        visualize.main(base + ["--gallery", str(tmp_path), "--checkpoint", str(tmp_path / "nope.pth")])
    for extra, msg in ((["--topk", "0"], "--topk and --num_queries must be >= 1"),
                       (["--failures"], "cannot be combined with --query")):
        with pytest.raises(SystemExit):
            visualize.main(base + extra)
        assert msg in capsys.readouterr().err
    # an --out that is a file: named before any image is encoded
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"^--out {tmp_path / 'a_file'}: .* is a file, not a folder"):
        visualize.main(base[:4] + ["--out", str(tmp_path / "a_file"), "--gallery", str(tmp_path / "empty"),
                                   "--device", "cpu"])
    # an unreadable image: skipped with one warning naming it, the others still ranked
    gal = tmp_path / "gal"
    gal.mkdir()
    for k, c in enumerate([(200, 20, 20), (20, 20, 200)]):
        Image.new("RGB", (32, 64), c).save(gal / f"ok{k}.png")
    (gal / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with retrieval_warnings() as records:
        saved = visualize.main(base + ["--gallery", str(gal), "--topk", "5"])
    warnings = [r.getMessage() for r in records]
    assert len(warnings) == 1 and str(gal / "broken.jpg") in warnings[0]
    _, size, _ = G.caption_layout("a man", 2, (128, 256))
    assert Image.open(saved[0]).size == size  # two results, not three


@pytest.mark.parametrize("loss_names,num_classes", [("sdm+id", 9), ("sdm", None)])
def test_num_classes_from_checkpoint(tiny_synth, tmp_path, loss_names, num_classes):
    """A hand-made run whose classifier (9-way) differs from the dataset's 6 identities, and one without a
    classifier: from_run builds the right model in both cases and ranks with it."""
    args = get_args(TINY_RUN + ["--loss_names", loss_names, "--dataset_name", "SynthPEDES", "--root_dir",
                                str(tiny_synth), "--device", "cpu"])
    torch.manual_seed(0)
    model = build_model(args, num_classes=num_classes or 6, device=torch.device("cpu")).eval()
    assert hasattr(model, "classifier") == (num_classes is not None)
    save_train_configs(str(tmp_path), args)
    Checkpointer(model, save_dir=str(tmp_path)).save("best", epoch=1)
    r = R.Retriever.from_run(tmp_path / "configs.yaml", device="cpu")
    if num_classes:
        assert r.model.classifier.out_features == num_classes
    split = TQ.load_test_split(r.args)
    g = r.encode_images(split["img_paths"][:4], progress=False)
    with torch.no_grad():
        want = F.normalize(model.encode_image(torch.stack([r.transform(Image.open(p).convert("RGB"))
                                                           for p in g.paths])), dim=-1)
    assert torch.allclose(g.embeddings, want, atol=1e-5)


def small_gallery(folder):
    folder.mkdir()
    for k, c in enumerate([(200, 20, 20), (20, 20, 200), (20, 200, 20)]):
        Image.new("RGB", (32, 64), c).save(folder / f"img{k}.png")
    return folder


def test_empty_query_is_an_error_naming_it_and_keeps_earlier_grids(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--config_file", str(run_dir), "--gallery", str(small_gallery(tmp_path / "gal")), "--topk", "2",
            "--out", str(out), "--device", "cpu", "--num_workers", "0"]
    visualize.main(base + ["--query", "a man"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 1
    for bad in ["", "   "]:
        with pytest.raises(SystemExit):
            visualize.main(base + ["--query", "a man", "--query", bad])
        err = capsys.readouterr().err
        assert "--query must be a sentence" in err and repr(bad) in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing lost
    # the library refuses it as well (a notebook user has no parser)
    r = R.Retriever.from_run(run_dir, device="cpu")
    g = r.encode_folder(tmp_path / "gal", progress=False)
    with pytest.raises(ValueError, match="empty or whitespace only"):
        r.search(" ", g)


def test_long_query_cut_with_warning_and_header_shows_the_kept_text(run_dir, tmp_path, capsys):
    tok = SimpleTokenizer()
    six = "A Man in a RED jacket"
    assert len(tok.encode(six)) == 6  # each word is one BPE token
    query = " ".join([six] * 40)  # 240 tokens + SOT/EOT
    kept = " ".join(" ".join([six] * 13).lower().split()[:75])  # text_length 77 = SOT + 75 words + EOT
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / f"search_00_{G.slug(query)}.png"
    earlier.write_bytes(b"a grid from an earlier run")
    argv = ["--config_file", str(run_dir), "--gallery", str(small_gallery(tmp_path / "gal")), "--query", query,
            "--topk", "2", "--out", str(out), "--device", "cpu", "--num_workers", "0"]
    with retrieval_warnings() as records:
        saved = visualize.main(argv)
    msgs = [r.getMessage() for r in records]
    assert len(msgs) == 1 and "longer than text_length=77" in msgs[0] and "kept 77 of 242 tokens" in msgs[0]
    assert earlier.read_bytes() == b"a grid from an earlier run"  # not overwritten
    assert saved == [out / f"search_00_{G.slug(query)}_1.png"]
    # the header: the kept text (lower-cased as the model saw it), wrapped, at most MAX_CAPTION_LINES lines
    img = Image.open(saved[0]).convert("RGB")
    lines, size, boxes = G.caption_layout(kept, 2, (128, 256))
    assert img.size == size and len(lines) == G.MAX_CAPTION_LINES and lines[0].startswith("a man in a red")
    want = G.draw_search_grid(kept, [str(tmp_path / "gal" / "img0.png")] * 2, [0.0, 0.0], (128, 256))
    header = (0, 0, size[0], boxes[0][1])
    assert img.crop(header).tobytes() == want.crop(header).tobytes()
    as_typed = G.draw_search_grid(query, [str(tmp_path / "gal" / "img0.png")] * 2, [0.0, 0.0], (128, 256))
    assert as_typed.size == size and as_typed.crop(header).tobytes() != want.crop(header).tobytes()  # not as typed


def test_out_that_is_a_file_is_named_before_any_encoding(run_dir, tmp_path, monkeypatch):
    """--out pointing at a file (or below one) stops before the model or the gallery is touched, naming --out."""
    blocker = tmp_path / "grids"
    blocker.write_text("a file")
    monkeypatch.setattr(R.Retriever, "encode_folder", lambda *a, **k: pytest.fail("encoded before checking --out"))
    for out in (blocker, blocker / "sub"):
        with pytest.raises(NotADirectoryError, match=rf"^--out {re.escape(str(out))}: .* is a file, not a folder"):
            visualize.main(["--config_file", str(run_dir), "--query", "a man", "--gallery", str(tmp_path),
                            "--out", str(out), "--device", "cpu", "--num_workers", "0"])
    assert blocker.read_text() == "a file"


def test_gallery_photo_with_exif_orientation_is_encoded_upright(run_dir, tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 encodes as the same picture stored upright."""
    gallery = tmp_path / "phone"
    gallery.mkdir()
    upright = Image.new("RGB", (32, 64), (20, 40, 60))
    upright.paste((230, 10, 10), (0, 0, 32, 20))  # red top
    upright.save(gallery / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are the upright ones turned 90 CCW
    upright.transpose(Image.Transpose.ROTATE_90).save(gallery / "sideways.png", exif=exif.tobytes())
    r = R.Retriever.from_run(str(run_dir), None, "cpu", 4, 0)
    g = r.encode_folder(str(gallery))
    feats = {Path(p).name: f for p, f in zip(g.paths, g.embeddings)}
    assert torch.allclose(feats["upright.png"], feats["sideways.png"], atol=1e-5)

"""search/retrieval.py, search/split_queries.py and search/grid.py with a transparent stand-in model: image
embedding = mean RGB, text embedding = colour-word counts, so every score has a naive closed form. The real-model
end-to-end path is in tests/test_visualize.py."""
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from search import retrieval as R
from search import split_queries as TQ
from tests.conftest import retrieval_warnings
from search import grid as G
from utils.simple_tokenizer import get_tokenizer, tokenize

COLOURS = {"red": (230, 20, 20), "green": (20, 210, 30), "blue": (25, 30, 220), "yellow": (220, 220, 30),
           "white": (250, 250, 250)}


class ColourModel(torch.nn.Module):
    """encode_image: mean RGB [B, 3]; encode_text: the ids are (#red, #green, #blue) already."""

    def __init__(self):
        super().__init__()
        self.image_calls = 0
        self.images_seen = 0

    def encode_image(self, imgs):
        self.image_calls += 1
        self.images_seen += imgs.shape[0]
        return imgs.mean(dim=(2, 3))  # [B, 3, H, W] -> [B, 3]

    def encode_text(self, ids):
        return ids.float()


def colour_counts(text):
    words = text.lower().split()
    return torch.tensor([words.count("red"), words.count("green"), words.count("blue")], dtype=torch.long)


def colour_tokenize(text):
    """Stand-in tokenizer: the 'ids' are the colour counts, never cut."""
    ids = colour_counts(text)
    return R.TokenizedText(ids, ids.numel(), text)


def make_retriever(run_dir=None, checkpoint=None, batch_size=3):
    tf = T.Compose([T.Resize((16, 8)), T.ToTensor()])
    return R.Retriever(ColourModel(), tf, colour_tokenize, torch.device("cpu"), run_dir=run_dir,
                       checkpoint=checkpoint, batch_size=batch_size)


def write_gallery(folder):
    (folder / "sub" / "deeper").mkdir(parents=True)
    paths = {}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        sub = folder if i % 2 == 0 else folder / "sub" / "deeper"
        ext = ".JPG" if name == "yellow" else (".png" if i % 2 else ".jpg")
        p = sub / f"{name}{ext}"
        Image.new("RGB", (20, 40), rgb).save(p, quality=100) if ext.lower() == ".jpg" else Image.new(
            "RGB", (20, 40), rgb).save(p)
        paths[name] = str(p)
    (folder / "notes.txt").write_text("not an image")
    return paths


def naive_scores(retriever, paths, query):
    q = F.normalize(colour_counts(query).float(), dim=0)
    out = {}
    for p in paths:
        x = retriever.transform(Image.open(p).convert("RGB")).mean(dim=(1, 2))
        out[p] = float(F.normalize(x, dim=0) @ q)
    return out


def test_list_images_recursive_and_errors(tmp_path):
    paths = write_gallery(tmp_path / "g")
    assert R.list_images(tmp_path / "g") == sorted(paths.values())  # .JPG counted, .txt ignored, recursive
    (tmp_path / "empty" / "x").mkdir(parents=True)
    (tmp_path / "empty" / "x" / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="contains no images"):
        R.list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.list_images(tmp_path / "nope")


def test_list_images_symlink_rule(tmp_path, caplog):
    """The gallery's symlink rule: links are followed inside the folder (a loop ends, each real file is listed
    once); links to files or folders outside it are skipped with a warning naming them; a broken link is skipped."""
    paths = write_gallery(tmp_path / "g")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "more").mkdir(parents=True)
    Image.new("RGB", (4, 8), (1, 2, 3)).save(elsewhere / "out.png")
    Image.new("RGB", (4, 8), (1, 2, 3)).save(elsewhere / "more" / "deep.jpg")
    g = tmp_path / "g"
    os.symlink(elsewhere / "out.png", g / "link_to_file.png")          # a file outside
    os.symlink(elsewhere / "more", g / "linked_dir")                    # a folder outside
    os.symlink(g, g / "sub" / "loop")                                    # a loop back to the top
    os.symlink(paths["red"], g / "sub" / "again_red.jpg")               # a second name of a gallery file
    os.symlink(tmp_path / "nowhere.png", g / "broken.png")              # a broken link
    with caplog.at_level("INFO", logger="IRRA.retrieval"):
        listed = R.list_images(g)
    os.symlink(g / "sub", g / "sub_again")                              # a folder link inside the gallery
    assert listed == sorted(paths.values())
    assert (f"2 symbolic link(s) lead outside the folder and are skipped ({g / 'link_to_file.png'}, "
            f"{g / 'linked_dir'})") in caplog.text
    assert R.list_images(g) == sorted(paths.values())  # the same file reached twice inside: listed once


def test_search_sorted_and_matches_naive_cosine(tmp_path):
    paths = write_gallery(tmp_path / "g")
    r = make_retriever()
    g = r.encode_images(R.list_images(tmp_path / "g"), progress=False)
    assert len(g) == 5 and g.embeddings.shape == (5, 3)
    assert torch.allclose(g.embeddings.norm(dim=1), torch.ones(5))
    for query, best in [("a man in a red jacket", "red"), ("blue trousers", "blue"), ("green green bag", "green")]:
        scores, idx = r.search(query, g.embeddings, topk=10)
        assert scores.shape == (5,) and idx.shape == (5,)  # topk capped at the gallery size
        assert torch.all(scores[:-1] >= scores[1:])
        assert g.paths[idx[0]] == paths[best]
        naive = naive_scores(r, g.paths, query)
        for s, i in zip(scores.tolist(), idx.tolist()):
            assert s == pytest.approx(naive[g.paths[i]], abs=1e-5)
    # several queries at once: [Q, k]; same numbers as one by one
    scores, idx = r.search(["red", "blue"], g, topk=2)
    assert scores.shape == (2, 2)
    assert g.paths[idx[1, 0]] == paths["blue"]
    assert torch.allclose(scores[0], r.search("red", g.embeddings, 2)[0])
    with pytest.raises(ValueError, match="non-empty"):
        r.search("red", torch.zeros(0, 3))


def test_unreadable_image_skipped_with_one_warning(tmp_path):
    paths = write_gallery(tmp_path / "g")
    bad1, bad2 = tmp_path / "g" / "broken.jpg", tmp_path / "g" / "sub" / "zero.png"
    bad1.write_bytes(b"\xff\xd8 this is not a jpeg")
    bad2.write_bytes(b"")
    r = make_retriever()
    iotools_records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = iotools_records.append
    logging.getLogger("IRRA.iotools").addHandler(handler)
    try:
        with retrieval_warnings() as warnings:
            g = r.encode_images(R.list_images(tmp_path / "g"), progress=False)
    finally:
        logging.getLogger("IRRA.iotools").removeHandler(handler)
    assert len(warnings) == 1 and iotools_records == []  # one read attempt per file, no per-file retry warnings
    assert str(bad1) in warnings[0].getMessage() and str(bad2) in warnings[0].getMessage()
    assert sorted(g.paths) == sorted(paths.values()) and sorted(g.skipped) == sorted([str(bad1), str(bad2)])
    all_paths = R.list_images(tmp_path / "g")
    assert [all_paths[i] for i in g.indices] == g.paths
    with pytest.raises(ValueError, match="could be opened"):
        r.encode_images([str(bad1), str(bad2)], progress=False)
    with pytest.raises(ValueError, match="empty gallery"):
        r.encode_images([], progress=False)


def gallery_and_run(tmp_path):
    """A gallery folder ``g``, a run directory with a (fake) best.pth and a retriever of that run."""
    paths = write_gallery(tmp_path / "g")
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "best.pth"
    ckpt.write_bytes(b"weights v1")
    return paths, run, ckpt, make_retriever(run_dir=run, checkpoint=ckpt)


def test_gallery_cache_reused_and_invalidated(tmp_path):
    paths, run, ckpt, r = gallery_and_run(tmp_path)
    g1 = r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 5 and len(list((run / R.CACHE_DIRNAME).glob("*.pt"))) == 1
    # second call (and several queries) reuse the cache: no image is encoded again
    g2 = r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 5
    assert g2.paths == g1.paths and torch.equal(g2.embeddings, g1.embeddings)
    for q in ["red", "blue"]:
        assert g2.paths[r.search(q, g2, 1)[1].item()] == paths[q]
    # a new retriever on the same run (a new process) also hits the cache
    r2 = make_retriever(run_dir=run, checkpoint=ckpt)
    r2.encode_folder(tmp_path / "g", progress=False)
    assert r2.model.images_seen == 0
    # adding a file encodes that file only, and the new file is searchable
    Image.new("RGB", (20, 40), (255, 0, 0)).save(tmp_path / "g" / "sub" / "pure_red.png")
    g3 = r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 5 + 1 and len(g3) == 6
    assert g3.paths[r.search("red", g3, 1)[1].item()].endswith("pure_red.png")
    # modifying a file (mtime/size) re-encodes that file only
    Image.new("RGB", (30, 60), (0, 0, 255)).save(tmp_path / "g" / "sub" / "pure_red.png")
    os.utime(tmp_path / "g" / "sub" / "pure_red.png", ns=(1, 1))
    g4 = r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 6 + 1
    assert not g4.paths[r.search("red", g4, 1)[1].item()].endswith("pure_red.png")
    # another checkpoint re-encodes everything
    ckpt.write_bytes(b"weights v2, retrained")
    r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 7 + 6
    r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 13
    # a corrupt cache file is rebuilt with a warning, not fatal
    (cache,) = (run / R.CACHE_DIRNAME).glob("*.pt")
    cache.write_bytes(b"garbage")
    with retrieval_warnings() as warnings:
        assert len(r.encode_folder(tmp_path / "g", progress=False)) == 6
    assert r.model.images_seen == 19
    assert len(warnings) == 1 and f"ignoring unreadable gallery cache {cache}" in warnings[0].getMessage()
    r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 19


def test_a_same_size_rewrite_with_only_a_new_mtime_re_encodes(tmp_path):
    """A retrained checkpoint of the same architecture, or an image rewritten in place, has the same size: the
    modification time alone must invalidate the cache."""
    paths, run, ckpt, r = gallery_and_run(tmp_path)
    r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 5
    red = paths["red"]
    size, mtime = os.path.getsize(red), os.stat(red).st_mtime_ns
    os.utime(red, ns=(mtime + 10**9, mtime + 10**9))  # same bytes, same size, new mtime
    r.encode_folder(tmp_path / "g", progress=False)
    assert os.path.getsize(red) == size and r.model.images_seen == 6  # that file only
    ckpt.write_bytes(b"weights v2")  # same size as v1
    os.utime(ckpt, ns=(os.stat(ckpt).st_mtime_ns + 10**9,) * 2)
    r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 11
    r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 11


@pytest.mark.parametrize("damage, problem", [
    (lambda c: list(c.values()), "expected a dict, got list"),
    (lambda c: {k: v for k, v in c.items() if k != "rows"}, "missing keys ['rows']"),
    (lambda c: dict(c, rows=c["rows"][:-1]), "rows must be an int64 tensor of 5 entries"),
    (lambda c: dict(c, rows=c["rows"] + 1), "rows must be -1 or in 0..4"),
    (lambda c: dict(c, size=c["size"].float()), "size must be an int64 tensor"),
    (lambda c: dict(c, embeddings=c["embeddings"].new_full(c["embeddings"].shape, float("nan"))), "NaN"),
    (lambda c: dict(c, embeddings=c["embeddings"][:, 0]), "float [N, D] tensor"),
    (lambda c: dict(c, paths=c["paths"].split("\0")), "paths must be one string"),
])
def test_a_damaged_cache_is_re_encoded_with_a_warning(tmp_path, damage, problem):
    write_gallery(tmp_path / "g")
    r = make_retriever(run_dir=tmp_path / "run")
    good = r.encode_folder(tmp_path / "g", progress=False)
    (cache,) = (tmp_path / "run" / R.CACHE_DIRNAME).glob("*.pt")
    torch.save(damage(torch.load(cache, weights_only=True)), cache)
    with retrieval_warnings() as warnings:
        g = r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 10 and g.paths == good.paths and torch.equal(g.embeddings, good.embeddings)
    (w,) = warnings
    assert f"ignoring gallery cache {cache}" in w.getMessage() and problem in w.getMessage()
    r.encode_folder(tmp_path / "g", progress=False)  # rewritten: used again
    assert r.model.images_seen == 10


def test_a_cache_folder_that_cannot_be_made_only_loses_the_cache(tmp_path):
    paths = write_gallery(tmp_path / "g")
    run = tmp_path / "run"
    run.mkdir()
    (run / R.CACHE_DIRNAME).write_text("a file where the cache folder goes")
    r = make_retriever(run_dir=run)
    calls = []
    real = r.encode_images
    r.encode_images = lambda *a, **k: calls.append(len(warnings)) or real(*a, **k)
    with retrieval_warnings() as warnings:
        g = r.encode_folder(tmp_path / "g", progress=False)
    assert calls == [1]  # the warning came before the encoding
    assert "gallery cache folder" in warnings[0].getMessage() and "searching without the cache" in warnings[0].getMessage()
    assert g.paths[r.search("red", g, 1)[1].item()] == paths["red"]
    assert (run / R.CACHE_DIRNAME).read_text() == "a file where the cache folder goes"


def test_cache_keeps_skipped_list(tmp_path):
    write_gallery(tmp_path / "g")
    (tmp_path / "g" / "broken.png").write_bytes(b"nope")
    r = make_retriever(run_dir=tmp_path / "run")
    r.encode_folder(tmp_path / "g", progress=False)
    with retrieval_warnings() as warnings:
        g = r.encode_folder(tmp_path / "g", progress=False)
    assert r.model.images_seen == 5 and g.skipped == [str(tmp_path / "g" / "broken.png")]
    assert len(warnings) == 1 and "broken.png" in warnings[0].getMessage()  # still reported from the cache


def test_wrap_text_keeps_every_word_within_width():
    font = G.load_font(G.CAPTION_FONT_SIZE)
    text = ("The woman is wearing a long sleeved white shirt, a pair of dark blue jeans and black shoes. She carries "
            "a red handbag on her left shoulder " + "x" * 80)
    lines = G.wrap_text(text, font, 200)
    assert len(lines) > 5
    assert all(font.getlength(line) <= 200 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def frame_colour(img, box):
    """Colour at the middle of the left frame edge and the top-left frame corner (both must agree)."""
    x0, y0, x1, y1 = box
    mid = img.getpixel((x0 + G.FRAME // 2, (y0 + y1) // 2))
    corner = img.getpixel((x0 + 1, y0 + 1))
    assert mid == corner
    return mid


def test_query_grid_frame_colours_follow_identities(tmp_path):
    paths = write_gallery(tmp_path / "g")
    names = list(COLOURS)
    pids = [3, 7, 3, 3, 9]
    res = TQ.QueryResult(index=12, caption="a person in red " * 30, pid=3, gt_path=paths["red"],
                        paths=[paths[n] for n in names], pids=pids, scores=[0.9, 0.8, 0.7, 0.6, 0.5])
    img = TQ.draw_query_grid(res)
    img.save(tmp_path / "q.png")
    img = Image.open(tmp_path / "q.png").convert("RGB")
    lines, (w, h), boxes = G.caption_layout(TQ.query_title(res), 6)
    assert TQ.query_title(res).startswith("[query 12, pid 3] a person in red")
    assert img.size == (w, h) and len(lines) >= 3  # the long caption is wrapped, not cut
    assert boxes[0][2] - boxes[0][0] + 1 == 128 + 2 * G.FRAME and boxes[0][3] - boxes[0][1] + 1 == 256 + 2 * G.FRAME
    assert frame_colour(img, boxes[0]) == G.GT_COLOR
    for box, pid in zip(boxes[1:], pids):
        assert frame_colour(img, box) == (G.MATCH_COLOR if pid == 3 else G.MISMATCH_COLOR)
    # the image is inside the frame: the blue gallery image (index 2) shows blue at its centre
    x0, y0, x1, y1 = boxes[3]
    r_, g_, b_ = img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
    assert b_ > 180 and r_ < 60
    # caption text is drawn on every wrapped line (dark pixels in each line band)
    lh = G._line_height(G.load_font(G.CAPTION_FONT_SIZE))
    for i in range(len(lines)):
        band = img.crop((0, G.MARGIN + i * lh, w, G.MARGIN + (i + 1) * lh)).convert("L")
        assert band.getextrema()[0] < 100


def test_search_grid_is_neutral_and_sized_to_run_aspect(tmp_path):
    paths = write_gallery(tmp_path / "g")
    tile = G.tile_size_for(type("A", (), {"img_size": (384, 128)})())
    assert tile == (128, 384)
    img = G.draw_search_grid("red", [paths["red"], paths["blue"]], torch.tensor([0.9, 0.1]), tile)
    (w, h), boxes = G.grid_layout(2, 1, tile)
    assert img.size == (w, h)
    assert {frame_colour(img, b) for b in boxes} == {G.NEUTRAL_COLOR}


def test_pick_queries():
    def res(i, ok):
        return TQ.QueryResult(i, f"c{i}", 1, None, ["p"], [1 if ok else 2], [0.5])

    results = [res(i, ok) for i, ok in enumerate([True, False, True, False, False, True])]
    assert [q.index for q in TQ.pick_queries(results, failures=True, num_queries=10)] == [1, 3, 4]
    assert [q.index for q in TQ.pick_queries(results, failures=True, num_queries=2)] == [1, 4]
    assert [q.index for q in TQ.pick_queries(results, num_queries=3)] == [0, 2, 5]  # spread over the split
    assert [q.index for q in TQ.pick_queries(results, query_indices=[5, 0])] == [5, 0]
    with pytest.raises(ValueError, match=r"out of range.*6 queries"):
        TQ.pick_queries(results, query_indices=[6])
    assert TQ.pick_queries([res(0, True)], failures=True) == []


def test_from_run_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs.yaml"):
        R.Retriever.from_run(tmp_path)
    (tmp_path / "configs.yaml").write_text("dataset_name: SynthPEDES\n")
    with pytest.raises(FileNotFoundError, match="best.pth"):
        R.Retriever.from_run(tmp_path / "configs.yaml")
    with pytest.raises(FileNotFoundError, match="last.pth"):
        R.Retriever.from_run(tmp_path, checkpoint=tmp_path / "last.pth")


# ------------------------------------------------------------------ bad / long sentences (one BPE token per word)
SIX_TOKENS = "a man in a red jacket"


def test_query_tokenizer_cuts_like_training_and_keeps_the_text():
    tok = get_tokenizer()
    assert len(tok.encode(SIX_TOKENS)) == 6  # the premise: each of these words is one BPE token
    qt = R.QueryTokenizer(tok, text_length=10)  # SOT + 8 words + EOT
    long_text = "A Man in a RED jacket " * 5  # 30 words
    t = qt(long_text)
    assert t.was_cut and t.num_tokens == 30 + 2
    assert t.text == "a man in a red jacket a man"  # the first 8 words, cleaned (lower case) as the model sees them
    assert torch.equal(t.ids, tokenize(long_text, tok, text_length=10, truncate=True))  # the ids training uses
    short = qt("A Man in RED")
    assert not short.was_cut and short.num_tokens == 6 and short.text == "A Man in RED"  # shown as typed
    assert torch.equal(short.ids[6:], torch.zeros(4, dtype=torch.long))


def test_empty_or_whitespace_query_is_an_error(tmp_path):
    write_gallery(tmp_path / "g")
    r = make_retriever()
    g = r.encode_images(R.list_images(tmp_path / "g"), progress=False)
    for bad in ["", "   ", "\t\n"]:
        with pytest.raises(ValueError, match="empty or whitespace only"):
            r.search(bad, g)
        with pytest.raises(ValueError, match="query 1 is empty"):
            r.encode_texts(["red", bad])
    r_bpe = R.Retriever(ColourModel(), r.transform, R.QueryTokenizer(get_tokenizer(), 77), torch.device("cpu"))
    with pytest.raises(ValueError, match="holds no words"):
        r_bpe.encode_texts(["&nbsp;"])  # not blank as typed, blank once cleaned


def test_long_query_cut_with_one_warning_saying_how_much_was_kept():
    r = R.Retriever(ColourModel(), None, R.QueryTokenizer(get_tokenizer(), 10), torch.device("cpu"))
    with retrieval_warnings() as warnings:
        emb = r.encode_texts([SIX_TOKENS * 1, (SIX_TOKENS + " ") * 3])
    assert emb.shape == (2, 10)
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "query 1 is longer than text_length=10" in msg and "kept 10 of 20 tokens" in msg
    assert "a man in a red jacket a man" in msg
    assert r.kept_text((SIX_TOKENS + " ") * 3) == "a man in a red jacket a man"
    assert r.kept_text(SIX_TOKENS) == SIX_TOKENS
    with retrieval_warnings() as warnings:
        r.encode_texts([SIX_TOKENS + " red", (SIX_TOKENS + " ") * 2, (SIX_TOKENS + " ") * 4])
    assert len(warnings) == 1 and "2 of 3 queries" in warnings[0].getMessage()
    assert "of 14 to 26" in warnings[0].getMessage()


def test_long_caption_header_is_wrapped_and_capped():
    font = G.load_font(G.CAPTION_FONT_SIZE)
    text = "word " * 400
    lines, (w, h), _ = G.caption_layout(text, 2)
    width = 2 * (128 + 2 * G.FRAME) + G.TILE_GAP
    assert len(G.wrap_text(text, font, width)) > G.MAX_CAPTION_LINES  # would be taller uncapped
    assert len(lines) == G.MAX_CAPTION_LINES and lines[-1].endswith(G.ELLIPSIS)
    assert all(font.getlength(line) <= width for line in lines)
    assert h == G.grid_layout(2, G.MAX_CAPTION_LINES)[0][1]
    assert G.caption_layout("a short one", 2)[0] == ["a short one"]


def test_save_new_png_never_overwrites(tmp_path):
    first = tmp_path / "q.png"
    first.write_bytes(b"an earlier grid")
    (tmp_path / "q_1.png").write_bytes(b"another one")
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    out = G.save_new_png(img, first)
    assert out == tmp_path / "q_2.png" and Image.open(out).getpixel((0, 0)) == (1, 2, 3)
    assert first.read_bytes() == b"an earlier grid" and (tmp_path / "q_1.png").read_bytes() == b"another one"
    assert G.save_new_png(img, tmp_path / "new.png") == tmp_path / "new.png"

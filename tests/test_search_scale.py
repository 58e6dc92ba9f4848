"""Galleries at scale (search/cache.py, search/index.py): the per-file gallery cache re-encodes only new or changed
files, the caption cache and what invalidates it, and the int8 index against a naive exact search."""
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from methods.base import Method
from search import index as X
from search import retrieval as R
from tests.conftest import retrieval_warnings
from tests.test_retrieval import ColourModel, colour_tokenize, gallery_and_run, make_retriever
from utils.simple_tokenizer import get_tokenizer


def record_encoded(r):
    """Wrap r.encode_images: the list of the paths each call encodes."""
    calls, real = [], r.encode_images
    r.encode_images = lambda paths, **k: calls.append(list(paths)) or real(paths, **k)
    return calls


def test_a_growing_gallery_encodes_only_its_new_and_changed_files(tmp_path):
    paths, run, ckpt, r = gallery_and_run(tmp_path)
    calls = record_encoded(r)
    g1 = r.encode_folder(tmp_path / "g", progress=False)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(paths.values())
    new1, new2 = tmp_path / "g" / "a_new.png", tmp_path / "g" / "sub" / "z_new.jpg"
    Image.new("RGB", (20, 40), (10, 240, 10)).save(new1)
    Image.new("RGB", (20, 40), (200, 10, 200)).save(new2, quality=100)
    g2 = r.encode_folder(tmp_path / "g", progress=False)
    assert len(calls) == 2 and sorted(calls[1]) == sorted([str(new1), str(new2)])  # only the two new files
    assert r.model.images_seen == 5 + 2 and len(g2) == 7
    assert g2.paths == R.list_images(tmp_path / "g") and g2.indices == list(range(7))
    for p, e in zip(g1.paths, g1.embeddings):  # the old rows are the cached ones, moved to their new places
        assert torch.equal(g2.embeddings[g2.paths.index(p)], e)
    fresh = make_retriever().encode_images(g2.paths, progress=False)  # what encoding everything gives
    assert torch.allclose(g2.embeddings, fresh.embeddings, atol=1e-6)
    # a changed file (new size) is encoded again, alone
    Image.new("RGB", (30, 50), (0, 0, 250)).save(new1)
    r.encode_folder(tmp_path / "g", progress=False)
    assert calls[2:] == [[str(new1)]]
    # a removed file drops out of the gallery and of the cache; nothing is encoded
    os.remove(paths["green"])
    g3 = r.encode_folder(tmp_path / "g", progress=False)
    assert len(calls) == 3 and paths["green"] not in g3.paths and len(g3) == 6
    (cache,) = (run / R.CACHE_DIRNAME).glob("*.pt")
    c = torch.load(cache, weights_only=True)
    assert sorted(c["paths"].split("\0")) == sorted(os.path.abspath(p) for p in g3.paths)
    assert c["embeddings"].shape == (6, 3)
    # putting it back encodes it again (it left the cache)
    Image.new("RGB", (20, 40), (20, 210, 30)).save(paths["green"], quality=100)
    r.encode_folder(tmp_path / "g", progress=False)
    assert calls[3:] == [[paths["green"]]]
    r.encode_folder(tmp_path / "g", progress=False)
    assert len(calls) == 4


def test_an_unreadable_file_is_not_retried_until_it_changes(tmp_path):
    paths, run, ckpt, r = gallery_and_run(tmp_path)
    bad = tmp_path / "g" / "broken.png"
    bad.write_bytes(b"not a png")
    calls = record_encoded(r)
    r.encode_folder(tmp_path / "g", progress=False)
    with retrieval_warnings() as warnings:
        g = r.encode_folder(tmp_path / "g", progress=False)
    assert len(calls) == 1 and g.skipped == [str(bad)] and len(g) == 5
    assert len(warnings) == 1 and "broken.png" in warnings[0].getMessage()
    Image.new("RGB", (20, 40), (1, 2, 3)).save(bad)  # repaired
    g = r.encode_folder(tmp_path / "g", progress=False)
    assert calls[1:] == [[str(bad)]] and g.skipped == [] and len(g) == 6


def test_an_older_cache_format_is_re_encoded_quietly(tmp_path):
    paths, run, ckpt, r = gallery_and_run(tmp_path)
    r.encode_folder(tmp_path / "g", progress=False)
    (cache,) = (run / R.CACHE_DIRNAME).glob("*.pt")
    torch.save({"key": "abc", "paths": [], "embeddings": torch.zeros(1, 3), "indices": [], "skipped": []}, cache)
    with retrieval_warnings() as warnings:
        r.encode_folder(tmp_path / "g", progress=False)
    assert warnings == [] and r.model.images_seen == 10


# ------------------------------------------------------------------ the caption cache
CAPTIONS = ["a red coat", "blue blue jeans", "green bag and red shoes"]


class TwoSets(Method):
    """A method with a second feature set (the colour counts reversed)."""

    name = "two_sets"
    feature_sets = ("global", "reversed")

    def encode_texts(self, model, text):
        f = model.encode_text(text).float()
        return {"global": f, "reversed": f.flip(1)}


def caption_retriever(run, ckpt, tokenize=colour_tokenize, method=None, feature_set=None):
    r = R.Retriever(ColourModel(), None, tokenize, torch.device("cpu"), run_dir=run, checkpoint=ckpt,
                    method=method, feature_set=feature_set)
    calls, real = [], r.encode_texts
    r.encode_texts = lambda texts: calls.append(list(texts)) or real(texts)
    return r, calls


def test_caption_cache_reused_and_invalidated(tmp_path):
    paths, run, ckpt, _ = gallery_and_run(tmp_path)
    r, calls = caption_retriever(run, ckpt)
    first = r.encode_captions(CAPTIONS, "test_x_captions")
    assert calls == [CAPTIONS] and (run / R.CACHE_DIRNAME / "test_x_captions.pt").is_file()
    assert torch.equal(first, r.encode_texts(CAPTIONS))
    calls.clear()
    r2, calls2 = caption_retriever(run, ckpt)  # a second start
    assert torch.equal(r2.encode_captions(CAPTIONS, "test_x_captions"), first) and calls2 == []
    # other captions (one changed, one more, another order) are encoded again
    for captions in (CAPTIONS[:2] + ["green bag"], CAPTIONS + ["red"], CAPTIONS[::-1]):
        r2.encode_captions(captions, "test_x_captions")
        assert calls2[-1] == captions
    calls2.clear()
    r2.encode_captions(CAPTIONS[::-1], "test_x_captions")
    assert calls2 == []
    # another checkpoint (same size, new mtime), another feature set, another text length
    ckpt.write_bytes(b"weights v2")
    os.utime(ckpt, ns=(os.stat(ckpt).st_mtime_ns + 10**9,) * 2)
    r2.encode_captions(CAPTIONS[::-1], "test_x_captions")
    assert len(calls2) == 1
    for method, feature_set, encoded in [(TwoSets(), "global", 1), (TwoSets(), "global", 0),
                                         (TwoSets(), "reversed", 1)]:  # another method name, another feature set
        r3, calls3 = caption_retriever(run, ckpt, method=method, feature_set=feature_set)
        r3.encode_captions(CAPTIONS[::-1], "test_x_captions")
        assert len(calls3) == encoded
    emb = {}
    for length in (10, 12, 10):
        r4, calls4 = caption_retriever(run, ckpt, tokenize=R.QueryTokenizer(get_tokenizer(), length))
        emb[length] = r4.encode_captions(CAPTIONS, "test_x_captions")
        assert len(calls4) == 1 and emb[length].shape == (3, length)


@pytest.mark.parametrize("damage, problem", [
    (lambda c: b"garbage", "ignoring unreadable caption cache"),
    (lambda c: [1, 2], "expected a dict, got list"),
    (lambda c: {k: v for k, v in c.items() if k != "embeddings"}, "missing keys ['embeddings']"),
    (lambda c: dict(c, embeddings=c["embeddings"][:2]), "2 embedding rows for 3 captions"),
    (lambda c: dict(c, embeddings=c["embeddings"] * float("inf")), "NaN or infinite"),
])
def test_a_damaged_caption_cache_is_rebuilt_with_a_warning(tmp_path, damage, problem):
    paths, run, ckpt, _ = gallery_and_run(tmp_path)
    r, calls = caption_retriever(run, ckpt)
    good = r.encode_captions(CAPTIONS, "caps")
    f = run / R.CACHE_DIRNAME / "caps.pt"
    bad = damage(torch.load(f, weights_only=True))
    f.write_bytes(bad) if isinstance(bad, bytes) else torch.save(bad, f)
    with retrieval_warnings() as warnings:
        again = r.encode_captions(CAPTIONS, "caps")
    assert len(calls) == 2 and torch.equal(again, good)
    assert len(warnings) == 1 and problem in warnings[0].getMessage() and str(f) in warnings[0].getMessage()
    r.encode_captions(CAPTIONS, "caps")  # rewritten: used again
    assert len(calls) == 2


# ------------------------------------------------------------------ the index
def naive_topk(q, g, k):
    """Exact top-k, one query and one image at a time."""
    out = []
    for row in q:
        scores = [float(sum(a * b for a, b in zip(row.tolist(), img.tolist()))) for img in g]
        out.append(sorted(range(len(scores)), key=lambda j: -scores[j])[:k])
    return torch.tensor(out)


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("kernel", ["fbgemm", "int8pack"])
def test_int8_index_recall_against_a_naive_exact_search(kernel):
    if kernel == "fbgemm" and not X._fbgemm_available():
        pytest.skip("no fbgemm in this PyTorch build")
    g, q = unit(3000, 32, 0), unit(6, 32, 1)
    k = 10
    exact = naive_topk(q, g, k)
    assert torch.equal(X.ExactIndex(g).search(q, k)[1], exact)  # the exact index is the naive search
    idx = X.Int8Index(g, rerank_factor=2, min_candidates=20, block_rows=1000, kernel=kernel)
    assert len(idx.blocks) == 3
    scores, found = idx.search(q, k)
    assert X.recall_at_k(found, exact) == 1.0  # 20 candidates of 3000 hold the exact top-10
    assert torch.allclose(scores, (q[:, None, :] * g[found]).sum(-1), atol=1e-6)  # exact fp32 scores, sorted
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    approx = idx._scan(q)  # [6, 3000]: the int8 scan is close to the exact product, not equal to it
    assert 0 < (approx - q @ g.T).abs().max() < 0.02


def test_recall_at_k_counts_shared_indices():
    assert X.recall_at_k(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[3, 2, 9], [6, 5, 4]])) == 5 / 6
    with pytest.raises(ValueError, match=r"\[Q, k\]"):
        X.recall_at_k(torch.tensor([1, 2]), torch.tensor([1, 2]))


def test_exact_index_in_blocks_equals_one_product():
    g, q = unit(1000, 16, 2), unit(7, 16, 3)
    whole = X.ExactIndex(g).search(q, 25)
    blocked = X.ExactIndex(g, block_elems=7 * 64).search(q, 25)  # blocks of 64 images
    assert torch.equal(whole[1], blocked[1]) and torch.allclose(whole[0], blocked[0])


def test_retriever_switches_to_the_int8_index_at_the_threshold(tmp_path):
    paths, run, ckpt, _ = gallery_and_run(tmp_path)
    g = make_retriever().encode_folder(tmp_path / "g", progress=False)
    ranked = {}
    for name, threshold in [("auto", 6), ("auto", 5), ("exact", 1), ("int8", 10**6)]:
        r = R.Retriever(ColourModel(), None, colour_tokenize, torch.device("cpu"), search_index=name,
                        index_threshold=threshold)
        ranked[name, threshold] = r.search(["red", "blue green"], g, topk=3)
        assert r._index.kind == ("int8" if (name, threshold) in [("auto", 5), ("int8", 10**6)] else "exact")
        same = r._index
        r.search("red", g, 1)
        assert r._index is same and r.index_for(g) is same  # built once per gallery
    for key, (scores, idx) in ranked.items():  # 5 images: every one is a candidate, so the same results
        assert torch.equal(idx, ranked["exact", 1][1]) and torch.allclose(scores, ranked["exact", 1][0])
    with pytest.raises(ValueError, match="unknown search index 'faiss'.*auto, exact, int8"):
        R.Retriever(ColourModel(), None, colour_tokenize, torch.device("cpu"), search_index="faiss")
    with pytest.raises(ValueError, match="threshold must be >= 1"):
        R.Retriever(ColourModel(), None, colour_tokenize, torch.device("cpu"), index_threshold=0)


def test_a_second_start_of_the_test_split_page_encodes_nothing(tmp_path):
    """SearchPage.for_test_split: the first start encodes the images and the captions, the second reads both caches
    and ranks the same."""
    from types import SimpleNamespace

    from search.server import SearchPage

    paths, run, ckpt, _ = gallery_and_run(tmp_path)
    names = sorted(paths)
    split = {"img_paths": [paths[n] for n in names], "image_pids": list(range(len(names))),
             "captions": [f"a {n} shirt" for n in names] + ["red and blue"], "caption_pids": list(range(len(names))) + [0]}
    args = SimpleNamespace(dataset_name="Colours", img_size=(16, 8), metrics=())  # the options the page reads
    metrics, seen = [], []
    for start in range(2):
        r = make_retriever(run_dir=run, checkpoint=ckpt)
        r.args = args
        calls = record_encoded(r)
        texts, real = [], r.encode_texts
        r.encode_texts = lambda t: texts.append(list(t)) or real(t)
        page = SearchPage.for_test_split(r, split, progress=False)
        metrics.append(page.test.metrics)
        seen.append((sum(map(len, calls)), sum(map(len, texts))))
    assert seen == [(5, 6), (0, 0)]
    assert metrics[0] == metrics[1] and metrics[0]["R1"] > 0
    assert sorted(p.name for p in (run / R.CACHE_DIRNAME).glob("*.pt")) == ["test_colours.pt", "test_colours_captions.pt"]


def test_the_page_ranks_through_the_retrievers_index_built_at_start(tmp_path):
    from search.server import SearchPage

    paths, run, ckpt, _ = gallery_and_run(tmp_path)
    answers = {}
    for name in ("int8", "exact"):
        r = R.Retriever(ColourModel(), make_retriever().transform, colour_tokenize, torch.device("cpu"), run_dir=run,
                        checkpoint=ckpt, search_index=name)
        page = SearchPage.for_folder(r, tmp_path / "g", progress=False)
        assert r._index is not None and r._index.kind == name  # built at start, before any query
        built = r._index
        answers[name] = [(x["name"], round(x["score"], 6)) for x in page.search("red", k=3)["results"]]
        assert r._index is built
    assert answers["int8"] == answers["exact"] and answers["exact"][0][0] == "red.jpg"

"""visualize.py end to end on a tiny SynthPEDES run: the real model, configs.yaml, best.pth, dataset registry.

The run directory is built by hand (configs.yaml + best.pth of a from-scratch ViT-Micro), which is what train.py
leaves behind; frame colours are checked against identities ranked independently here.
"""
import functools
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import visualize
from datasets import build as dbuild
from datasets.synthpedes import SynthPEDES
from model.build import build_model
from utils import retrieval as R
from utils.checkpoint import Checkpointer
from utils.iotools import save_train_configs
from utils.options import get_args
from utils.simple_tokenizer import SimpleTokenizer, tokenize

TINY = dict(num_train_ids=6, num_val_ids=0, num_test_ids=5, images_per_id=2, img_height=64, img_width=32, seed=3,
            show_progress=False)


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    """Registry entry SynthPEDES -> a tiny generated set (the default one is 1440 images)."""
    mp = pytest.MonkeyPatch()
    mp.setitem(dbuild.DATASET_REGISTRY, "SynthPEDES", functools.partial(SynthPEDES, **TINY))
    yield tmp_path_factory.mktemp("data")
    mp.undo()


@pytest.fixture(scope="module")
def run_dir(tiny_synth, tmp_path_factory):
    """logs/SynthPEDES/<run>/ with configs.yaml and best.pth of a scratch ViT-Micro with an id classifier."""
    run = tmp_path_factory.mktemp("logs") / "SynthPEDES" / "20240101_000000_tiny"
    run.mkdir(parents=True)
    args = get_args(["--dataset_name", "SynthPEDES", "--root_dir", str(tiny_synth), "--pretrain_choice",
                     "scratch:ViT-Micro", "--img_size", "64", "32", "--loss_names", "sdm+id", "--device", "cpu",
                     "--output_dir", str(run)])
    torch.manual_seed(0)
    model = build_model(args, num_classes=6, device=torch.device("cpu"))
    save_train_configs(str(run), args)
    Checkpointer(model, save_dir=str(run)).save("best", epoch=1)
    return run


def independent_ranking(run, split, topk):
    """Top-k test pids per caption, computed without utils.retrieval."""
    args = get_args(["--pretrain_choice", "scratch:ViT-Micro", "--img_size", "64", "32", "--loss_names", "sdm+id"])
    model = build_model(args, num_classes=6, device=torch.device("cpu")).eval()
    model.load_state_dict(torch.load(run / "best.pth", weights_only=True)["model"])
    tf = dbuild.build_transforms((64, 32), is_train=False)
    tok = SimpleTokenizer()
    with torch.no_grad():
        img = torch.stack([tf(Image.open(p).convert("RGB")) for p in split["img_paths"]])
        txt = torch.stack([tokenize(c, tok, 77) for c in split["captions"]])
        sim = F.normalize(model.encode_text(txt), dim=-1) @ F.normalize(model.encode_image(img), dim=-1).T
    scores, idx = sim.topk(topk, dim=1)
    pids = torch.tensor(split["image_pids"])
    return scores, pids[idx]


def frame_colour(img, box):
    x0, y0, x1, y1 = box
    return img.getpixel((x0 + R.FRAME // 2, (y0 + y1) // 2))


def read_grid_colours(png, caption, num_tiles, tile):
    img = Image.open(png).convert("RGB")
    _, size, boxes = R.caption_layout(caption, num_tiles, tile)
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
        res = R.QueryResult(q, split["captions"][q], pid, None, [], [], [])
        colours = read_grid_colours(png, R.query_title(res), topk + 1, tile)
        assert colours[0] == R.GT_COLOR
        want = [R.MATCH_COLOR if p == pid else R.MISMATCH_COLOR for p in topk_pids[q].tolist()]
        assert colours[1:] == want, f"query {q}"
    # same ranking as the library's
    results = R.rank_test_queries(R.Retriever.from_run(run_dir, device="cpu"), split, topk, progress=False)
    assert [r.pids for r in results] == topk_pids.tolist()
    assert torch.allclose(torch.tensor([r.scores for r in results]), scores, atol=1e-5)
    # the ground truth drawn first is an image of the query's identity
    assert all(split["image_pids"][split["img_paths"].index(r.gt_path)] == r.pid for r in results)

"""model/pretrained.py: the one home of weight files. Its boundaries (no model class, no run-directory layout), the one
image-grid function against both backbones, and the IRRA grid as an argument."""
import ast
import os

import pytest
import torch
import yaml

from model import pretrained
from model.clip_model import CLIP, ModifiedResNet, VisionTransformer
from model.pretrained import (image_grid, image_positions, infer_image_grid, load_pretrained_file,
                              resize_image_pos_embed, resize_pos_embed)
from utils import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_imports(rel_path):
    """Project modules (dotted) imported by the file ``rel_path``, at any depth of its code (lazy ones included)."""
    tree = ast.parse(open(os.path.join(ROOT, rel_path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if os.path.exists(os.path.join(ROOT, *n.split("."))) or
            os.path.isfile(os.path.join(ROOT, *n.split(".")) + ".py")}


def _closure(rel_path):
    """Every project module reached from ``rel_path`` through imports (a package's __init__ included)."""
    seen, todo = set(), [rel_path]
    while todo:
        path = todo.pop()
        for mod in _project_imports(path):
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
                pkg = os.path.join(*parts[:i], "__init__.py")
                if os.path.isfile(os.path.join(ROOT, pkg)) and pkg not in seen:
                    seen.add(pkg)
                    todo.append(pkg)
            f = os.path.join(*parts) + ".py"
            if os.path.isfile(os.path.join(ROOT, f)) and f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


def test_pretrained_imports_no_model_class():
    """clip_model.py and build.py stand above the weights module: it reaches neither (nor the model package, whose
    __init__ imports build.py), so no import circle can appear."""
    reached = _closure(os.path.join("model", "pretrained.py"))
    assert not {f for f in reached if f.startswith("model")}, reached


def test_generic_checkpoint_module_knows_no_model():
    reached = _closure(os.path.join("utils", "checkpoint.py"))
    assert not {f for f in reached if f.startswith("model") or f.startswith("solver")}, reached
    for name in ("BACKBONE_PREFIX", "is_irra_state_dict", "clip_state_dict_from_checkpoint", "checkpoint_num_classes"):
        assert not hasattr(checkpoint, name), f"utils.checkpoint.{name}: IRRA knowledge lives in model.pretrained"
        assert callable(getattr(pretrained, name)) or isinstance(getattr(pretrained, name), str)


def test_weights_module_does_not_read_the_run_directory(tmp_path):
    """A configs.yaml next to an IRRA checkpoint is not read here: the caller passes the grid (model/build.py reads
    it, see test_pretrain_irra)."""
    torch.manual_seed(0)
    clip = CLIP(64, (128, 32), 1, 64, 16, 16, 20, 300, 64, 1, 1)  # an 8x2 grid: 16 positions, also a square 4x4
    sd = {"base_model." + k: v for k, v in clip.state_dict().items()}
    path = str(tmp_path / "best.pth")
    torch.save({"model": sd}, path)
    with open(tmp_path / "configs.yaml", "w") as f:
        yaml.safe_dump({"img_size": [128, 32], "stride_size": 16}, f)
    with pytest.raises(ValueError, match=r"cannot tell the image grid of its 16 positional embeddings .*"
                                         r"candidates \[\(8, 2\), \(4, 4\)\]") as err:
        load_pretrained_file(path, (96, 32), 16)  # new 6x2 grid: 8x2 (same width) and 4x4 (square) fit
    assert path in str(err.value)
    clip_sd, irra_sd = load_pretrained_file(path, (96, 32), 16, old_grid=(8, 2))
    key = "visual.positional_embedding"
    assert set(irra_sd) == set(sd)
    torch.testing.assert_close(clip_sd[key], resize_pos_embed(sd["base_model." + key], None, 6, 2, old_grid=(8, 2)))
    # the file's own tensors are untouched
    assert torch.equal(irra_sd["base_model." + key], sd["base_model." + key])


@pytest.mark.parametrize("img_size, stride", [((64, 32), 16), ((72, 40), 16), ((384, 128), 16), ((64, 48), 12),
                                              ((32, 32), 32), ((100, 60), 7)])
def test_image_grid_is_the_vit_token_grid(img_size, stride):
    """The ViT's grid, its positional embedding and the patch embedding's output all agree with image_grid."""
    vit = VisionTransformer(img_size, patch_size=16, stride_size=stride, width=64, layers=0, heads=1, output_dim=8)
    rows, cols = image_grid(img_size, 16, stride)
    assert (vit.num_y, vit.num_x) == (rows, cols)
    with torch.no_grad():
        patches = vit.conv1(torch.zeros(1, 3, *img_size))  # [1, width, rows, cols]: torch's own arithmetic
        tokens = vit(torch.zeros(1, 3, *img_size))
    assert tuple(patches.shape[2:]) == (rows, cols)
    assert tokens.shape[1] == 1 + rows * cols == vit.positional_embedding.shape[0]


@pytest.mark.parametrize("img_size", [(64, 32), (96, 64), (384, 128), (32, 32)])
def test_image_grid_is_the_resnet_token_grid(img_size):
    """ModifiedResNet: image_grid(size, None) is its attention-pool grid (the stride is unused)."""
    rn = ModifiedResNet((1, 1, 1, 1), output_dim=8, heads=1, input_resolution=img_size, width=8).eval()
    rows, cols = image_grid(img_size, None)
    assert image_grid(img_size, None, 16) == image_grid(img_size, None, 3) == (rows, cols)
    assert rn.spacial_dim == (rows, cols)
    with torch.no_grad():
        tokens = rn(torch.zeros(1, 3, *img_size))
    assert tokens.shape[1] == 1 + rows * cols == rn.attnpool.positional_embedding.shape[0]


def test_image_grid_needs_a_stride_for_a_vit():
    with pytest.raises(ValueError, match="stride_size"):
        image_grid((64, 32), 16)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_image_positions_and_resize_follow_the_backbone(arch):
    torch.manual_seed(0)
    if arch == "vit":  # 64x64, patch 16: a 4x4 grid
        clip, patch, key, count = (CLIP(32, (64, 64), 1, 32, 16, 16, 20, 300, 32, 1, 1), 16,
                                   "visual.positional_embedding", 16)
    else:  # 64x64 / 32: a 2x2 grid
        clip, patch, key, count = (CLIP(32, (64, 64), (1, 1, 1, 1), 8, None, 16, 20, 300, 32, 1, 1), None,
                                   "visual.attnpool.positional_embedding", 4)
    sd = clip.state_dict()
    assert image_positions(sd) == (key, count, patch)
    pos = image_positions(sd)
    assert resize_image_pos_embed(sd, (64, 64), 16) is sd  # same grid: nothing to do
    out = resize_image_pos_embed(sd, (96, 96), 16)  # ViT 6x6, ResNet 3x3: the only old grid that fits is square
    new = image_grid((96, 96), patch, 16)
    assert out[pos.key].shape[0] == 1 + new[0] * new[1]
    torch.testing.assert_close(out[pos.key], resize_pos_embed(sd[pos.key], None, *new))
    assert image_positions({"token_embedding.weight": torch.zeros(3, 2)}) is None


def test_infer_image_grid_candidates():
    assert infer_image_grid(8, (6, 2)) == (4, 2)  # same width
    assert infer_image_grid(192, (24, 8)) == (24, 8)
    with pytest.raises(ValueError, match=r"w\.pth: .*no grid fits"):
        infer_image_grid(7, (6, 4), source="w.pth")

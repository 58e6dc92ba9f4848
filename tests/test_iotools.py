"""utils/iotools: read_image retries, json, configs.yaml (ours and the original's !!python/tuple format)."""
import argparse
import json
import logging
import os

import pytest
import torch
import yaml
from PIL import Image
from utils.iotools import (check_isfile, load_train_configs, mkdir_if_missing, read_image, read_json,
                           save_train_configs)

ORIGINAL_CONFIGS = """\
MLM: true
alpha: 0.9
batch_size: 64
beta: 0.999
bias_lr_factor: 2.0
cmt_depth: 4
dataset_name: CUHK-PEDES
id_loss_weight: 1.0
img_aug: true
img_size: !!python/tuple
- 384
- 128
local_rank: 0
loss_names: sdm+mlm+id
lr: 1.0e-05
milestones: !!python/tuple [20, 50]
name: iira
num_epoch: 60
output_dir: logs/CUHK-PEDES/20220606_000000_iira
pretrain_choice: ViT-B/16
root_dir: /data
sampler: random
temperature: 0.02
test_batch_size: 512
text_length: 77
training: true
val_dataset: test
"""


def test_read_image_ok_and_missing(tmp_path):
    p = tmp_path / "a.png"
    Image.new("L", (5, 7), 100).save(p)
    img = read_image(str(p))
    assert img.mode == "RGB" and img.size == (5, 7) and img.getpixel((0, 0)) == (100, 100, 100)
    with pytest.raises(FileNotFoundError, match=r"Image file does not exist: '.*nope.png'"):
        read_image(str(tmp_path / "nope.png"))


def test_read_image_retries_then_raises(tmp_path, monkeypatch, caplog):
    p = tmp_path / "bad.png"
    p.write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="IRRA.iotools"):
        with pytest.raises(OSError, match=r"Could not read image '.*bad.png' after 3 attempts"):
            read_image(str(p), retry_delay=0.0)
    assert caplog.text.count("attempt") == 3
    # a transient failure is retried and then succeeds
    good = tmp_path / "good.png"
    Image.new("RGB", (2, 2)).save(good)
    real_open, calls = Image.open, []

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) < 2:
            raise OSError("stale NFS handle")
        return real_open(path, *a, **k)

    monkeypatch.setattr(Image, "open", flaky)  # PIL.Image, which utils.iotools imports when it reads
    assert read_image(str(good), retries=3, retry_delay=0.0).size == (2, 2) and len(calls) == 2
    with pytest.raises(ValueError, match="retries must be >= 1"):
        read_image(str(good), retries=0)


def test_json_and_dirs(tmp_path):
    d = tmp_path / "x" / "y"
    mkdir_if_missing(str(d))
    mkdir_if_missing(str(d))
    assert d.is_dir()
    f = d / "a.json"
    f.write_text(json.dumps({"a": [1, 2]}))
    assert read_json(str(f)) == {"a": [1, 2]}
    assert check_isfile(str(f)) and not check_isfile(str(d / "b.json"))
    with pytest.raises(FileNotFoundError, match="JSON file not found: '.*b.json'"):
        read_json(str(d / "b.json"))
    f.write_text("{bad")
    with pytest.raises(ValueError, match="Malformed JSON in '.*a.json'"):
        read_json(str(f))


def test_save_and_load_round_trip(tmp_path):
    args = argparse.Namespace(img_size=(384, 128), milestones=(20, 50), lr=1e-5, name="x", MLM=True,
                              config=None, device=torch.device("cpu"))
    path = save_train_configs(str(tmp_path / "run"), args)
    assert path.endswith("configs.yaml")
    text = open(path).read()
    assert "!!python" not in text
    assert yaml.safe_load(text)["img_size"] == [384, 128]
    back = load_train_configs(str(tmp_path / "run"))
    assert isinstance(back, argparse.Namespace)
    assert back.img_size == (384, 128) and back.milestones == (20, 50) and back.lr == 1e-5
    assert back.MLM is True and back.config is None and back.device == "cpu"
    assert vars(load_train_configs(path)) == vars(back)  # the file itself works too


def test_load_original_configs_with_python_tuple(tmp_path):
    p = tmp_path / "configs.yaml"
    p.write_text(ORIGINAL_CONFIGS)
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(ORIGINAL_CONFIGS)  # why the SafeLoader subclass exists
    args = load_train_configs(str(tmp_path))
    assert args.img_size == (384, 128) and type(args.img_size) is tuple
    assert args.milestones == (20, 50) and args.lr == 1e-5 and args.batch_size == 64 and args.MLM is True
    assert args.dataset_name == "CUHK-PEDES" and args.loss_names == "sdm+mlm+id"


def test_unknown_python_tag_and_bad_files(tmp_path):
    p = tmp_path / "configs.yaml"
    p.write_text("lr: 1.0\nevil: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError, match=r"Cannot read config file '.*configs.yaml'.*unsupported YAML tag "
                                         r"'!!python/object/apply:os.system'"):
        load_train_configs(str(p))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_train_configs(str(p))
    with pytest.raises(FileNotFoundError, match="Config file not found: '.*missing.yaml'"):
        load_train_configs(str(tmp_path / "missing.yaml"))
    os.makedirs(tmp_path / "empty_run")
    with pytest.raises(FileNotFoundError, match="empty_run/configs.yaml"):
        load_train_configs(str(tmp_path / "empty_run"))

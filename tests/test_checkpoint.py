"""Checkpointer: atomic save, load (module. prefix, original format), num_classes mismatch, resume."""
import os

import pytest
import torch
from torch import nn

from model.pretrained import checkpoint_num_classes
from utils.checkpoint import Checkpointer, strip_prefix_if_present


class Tiny(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.base = nn.Linear(3, 4)
        self.classifier = nn.Linear(4, num_classes)


def _opt_sched(model):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return opt, sched


def _train(model, opt, sched, steps=2):
    for _ in range(steps):
        loss = model.classifier(model.base(torch.ones(2, 3))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_save_load_roundtrip_atomic(tmp_path):
    torch.manual_seed(0)
    m = Tiny()
    path = Checkpointer(m, save_dir=str(tmp_path)).save("best", epoch=7)
    assert path == str(tmp_path / "best.pth")
    assert os.listdir(tmp_path) == ["best.pth"]  # no temporary file left behind
    m2 = Tiny()
    extra = Checkpointer(m2).load(path)
    assert extra == {"epoch": 7}
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    m = Tiny()
    ck = Checkpointer(m, save_dir=str(tmp_path))
    path = ck.save("last", epoch=1)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save("last", epoch=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pth"]
    assert Checkpointer(Tiny()).load(path) == {"epoch": 1}


def test_load_module_prefix_and_original_format(tmp_path):
    m = Tiny()
    sd = {"module." + k: v for k, v in m.state_dict().items()}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ddp.pth")
    m2 = Tiny()
    assert Checkpointer(m2).load(str(tmp_path / "ddp.pth")) == {"epoch": 3}
    assert torch.equal(m2.classifier.weight, m.classifier.weight)
    assert strip_prefix_if_present({"a.b": 1}) == {"a.b": 1}


def test_num_classes_mismatch_message(tmp_path):
    path = Checkpointer(Tiny(5), save_dir=str(tmp_path)).save("best")
    with pytest.raises(ValueError) as err:
        Checkpointer(Tiny(7)).load(path)
    msg = str(err.value)
    assert "5" in msg and "7" in msg and "best.pth" in msg
    # the caller may skip the classifier on purpose
    Checkpointer(Tiny(7)).load(path, except_keys=["classifier.weight", "classifier.bias"], strict=False)


def test_missing_unexpected_keys(tmp_path):
    m = Tiny()
    sd = m.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["base.bias"]
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="base.bias") as err:
        Checkpointer(Tiny()).load(str(tmp_path / "odd.pth"))
    assert "extra.weight" in str(err.value)
    m2 = Tiny()
    Checkpointer(m2).load(str(tmp_path / "odd.pth"), strict=False)
    assert torch.equal(m2.base.weight, m.base.weight)


def test_resume_restores_optimizer_and_scheduler(tmp_path):
    torch.manual_seed(0)
    m = Tiny()
    opt, sched = _opt_sched(m)
    _train(m, opt, sched)
    path = Checkpointer(m, opt, sched, save_dir=str(tmp_path)).save("last", epoch=2, best_r1=55.5)

    m2 = Tiny()
    opt2, sched2 = _opt_sched(m2)
    extra = Checkpointer(m2, opt2, sched2).resume(path)
    assert extra == {"epoch": 2, "best_r1": 55.5}
    assert sched2.last_epoch == sched.last_epoch == 2
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.025)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        assert torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"])
    # one more identical step on both gives identical weights
    _train(m, opt, sched, 1)
    _train(m2, opt2, sched2, 1)
    for k, v in m.state_dict().items():
        assert torch.allclose(v, m2.state_dict()[k])


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Checkpointer(Tiny()).load(str(tmp_path / "nope.pth"))


def test_checkpoint_num_classes(tmp_path):
    path = Checkpointer(Tiny(9), save_dir=str(tmp_path)).save("best")
    assert checkpoint_num_classes(path) == 9
    torch.save({"model": {"module.classifier.weight": torch.zeros(6, 4)}}, tmp_path / "ddp.pth")
    assert checkpoint_num_classes(str(tmp_path / "ddp.pth")) == 6
    torch.save({"model": {"base.weight": torch.zeros(4, 3)}}, tmp_path / "noid.pth")
    assert checkpoint_num_classes(str(tmp_path / "noid.pth"), default=11) == 11


def test_except_keys_skip_by_substring_as_the_original():
    """``load_state_dict(model, sd, ["classifier"])`` (the original's third positional parameter) skips every key
    containing "classifier" on both sides, so a checkpoint with another number of classes loads the rest."""
    from utils.checkpoint import check_key, load_state_dict
    src, dst = torch.nn.Module(), torch.nn.Module()
    src.body, dst.body = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    src.classifier, dst.classifier = torch.nn.Linear(3, 5), torch.nn.Linear(3, 7)
    before = dst.classifier.weight.detach().clone()
    load_state_dict(dst, src.state_dict(), ["classifier"])
    assert torch.equal(dst.body.weight, src.body.weight) and torch.equal(dst.classifier.weight, before)
    assert check_key("classifier.weight", ["classifier"]) and not check_key("body.weight", ["classifier"])
    with pytest.raises(ValueError, match="classifier has 5 classes but the model has 7"):
        load_state_dict(dst, src.state_dict())

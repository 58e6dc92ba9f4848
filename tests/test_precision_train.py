"""Every precision trains a tiny IRRA on the CPU through the trainer (``train.main``): ``fp16`` (the original's
convert_weights, Adam eps 1e-3), ``amp_bf16`` and ``amp_fp16`` (autocast + GradScaler, including a step the scaler
skips on an injected inf).

The training set is replaced by one fixed batch repeated for the whole (single) epoch, so the loss of the same batch
must go down; hooks on the model record every training loss and the dtype the layers compute in.
"""
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train
from processor import setup
from tests.conftest import tiny_train_argv

# layers whose output dtype shows what a forward computes in: one per transformer (image, text, cross-modal) + MLM head
PROBED_LAYERS = ("base_model.visual.transformer.resblocks.0.mlp.c_fc", "base_model.transformer.resblocks.0.mlp.c_fc",
                 "cross_modal_transformer.resblocks.0.mlp.c_fc", "mlm_head.fc")
# the ratio last/first loss of the fixed batch must be below this ("clearly" down)
LOSS_DROP = 0.8


class RecordingGradScaler(torch.amp.GradScaler):
    """The trainer's GradScaler, recording per step: the scale, whether the (scaled) gradients held an inf/NaN and
    whether the optimizer changed any parameter."""

    instances: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.steps = []  # dicts: scale, nonfinite, updated, scale_after
        RecordingGradScaler.instances.append(self)

    def step(self, optimizer, *a, **k):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        before = [p.detach().clone() for p in params]
        rec = {"scale": self.get_scale(), "nonfinite": not all(bool(torch.isfinite(g).all()) for g in grads)}
        out = super().step(optimizer, *a, **k)
        rec["updated"] = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
        self.steps.append(rec)
        return out

    def update(self, *a, **k):
        super().update(*a, **k)
        self.steps[-1]["scale_after"] = self.get_scale()


class _RepeatedBatch(list):
    """The same batch ``steps`` times, as a train loader (its sampler's epoch does not matter)."""

    train_sampler = SimpleNamespace(set_epoch=lambda epoch: None)


def train_on_one_batch(monkeypatch, root: str, logs: str, precision: str, steps: int, *extra: str,
                       on_model=None) -> SimpleNamespace:
    """``train.main`` for one epoch of ``steps`` iterations over the first training batch (constant lr: no warmup).

    Returns the records: ``losses`` (per iteration, each loss term), ``compute_dtypes`` (output dtypes of
    PROBED_LAYERS in training forwards), ``model``, ``last`` (last.pth) and ``scalers`` (GradScalers made)."""
    real_build_dataloader, real_build_model = setup.build_dataloader, setup.build_model
    rec = SimpleNamespace(losses=[], compute_dtypes=set(), model=None)
    RecordingGradScaler.instances = []
    monkeypatch.setattr(torch.amp, "GradScaler", RecordingGradScaler)

    def build_dataloader(args, *a, **k):
        train_loader, val_img_loader, val_txt_loader, num_classes = real_build_dataloader(args, *a, **k)
        batch = next(iter(train_loader))
        repeated = _RepeatedBatch([batch] * steps)
        return repeated, val_img_loader, val_txt_loader, num_classes

    def build_model(*a, **k):
        model = real_build_model(*a, **k)
        rec.model = model
        model.register_forward_hook(
            lambda m, inp, out: rec.losses.append({k: float(v.detach()) for k, v in out.items() if "loss" in k}))
        for name in PROBED_LAYERS:
            model.get_submodule(name).register_forward_hook(
                lambda m, inp, out: rec.compute_dtypes.add(out.dtype) if m.training else None)
        if on_model is not None:
            on_model(model)
        return model

    monkeypatch.setattr(setup, "build_dataloader", build_dataloader)
    monkeypatch.setattr(setup, "build_model", build_model)
    res = train.main(tiny_train_argv(root, logs, "--num_epoch", "1", "--warmup_epochs", "0",
                                     "--precision", precision, *extra))
    rec.last = torch.load(os.path.join(res["run_dir"], "last.pth"), weights_only=True)
    rec.run_dir = res["run_dir"]
    rec.scalers = list(RecordingGradScaler.instances)
    return rec


def check_losses(losses: list, steps: int) -> list:
    """Every term of every iteration finite, the total of the fixed batch clearly down; returns the totals."""
    assert len(losses) == steps
    for i, terms in enumerate(losses):
        assert set(terms) == {"sdm_loss", "id_loss", "mlm_loss"}
        assert all(math.isfinite(v) for v in terms.values()), (i, terms)
    totals = [sum(t.values()) for t in losses]
    assert totals[-1] < LOSS_DROP * totals[0], totals
    return totals


def expected_fp16_names(model: nn.Module) -> set:
    """The parameters the original's convert_weights makes fp16: Conv/Linear weights and biases (attention output
    projections included), MultiheadAttention input projections, ``text_projection`` and ``proj``."""
    names = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for p_name, _ in mod.named_parameters(recurse=False):
            if (isinstance(mod, (nn.Linear, nn.Conv2d)) or p_name in ("in_proj_weight", "in_proj_bias")
                    or p_name in ("text_projection", "proj")):
                names.add(prefix + p_name)
    return names


def test_fp16_weights_train_with_adam(tiny_cuhk_root, tmp_path, monkeypatch):
    """--precision fp16: convert_weights (fp16 Linear/Conv, fp32 LayerNorm/embeddings), fp16 compute, no scaler,
    Adam with the original's eps 1e-3; the loss of a fixed batch goes down over 6 steps."""
    steps = 6
    rec = train_on_one_batch(monkeypatch, tiny_cuhk_root, str(tmp_path / "logs"), "fp16", steps,
                             "--optimizer", "Adam", "--adam_eps", "1e-3")
    check_losses(rec.losses, steps)
    params = dict(rec.model.named_parameters())
    fp16 = expected_fp16_names(rec.model)
    assert {"base_model.visual.conv1.weight", "classifier.weight", "mlm_head.fc.weight",
            "cross_attn.in_proj_weight", "base_model.text_projection"} <= fp16
    for name, p in params.items():  # after training: the optimizer kept every dtype
        assert p.dtype == (torch.float16 if name in fp16 else torch.float32), name
    assert params["base_model.ln_final.weight"].dtype == torch.float32
    assert params["base_model.token_embedding.weight"].dtype == torch.float32
    assert rec.compute_dtypes == {torch.float16}
    assert rec.scalers == []
    groups = rec.last["optimizer"]["param_groups"]
    assert {g["eps"] for g in groups} == {1e-3}
    assert rec.last["model"]["classifier.weight"].dtype == torch.float16


def test_amp_bf16_keeps_fp32_weights_and_computes_in_bf16(tiny_cuhk_root, tmp_path, monkeypatch):
    steps = 6
    rec = train_on_one_batch(monkeypatch, tiny_cuhk_root, str(tmp_path / "logs"), "amp_bf16", steps)
    check_losses(rec.losses, steps)
    assert {p.dtype for p in rec.model.parameters()} == {torch.float32}
    assert rec.compute_dtypes == {torch.bfloat16}
    assert rec.scalers == []  # bf16 has fp32's range: no loss scaling


def test_amp_fp16_grad_scaler_skips_inf_steps(tiny_cuhk_root, tmp_path, monkeypatch):
    """--precision amp_fp16: fp32 weights, fp16 compute, one GradScaler stepping every iteration. A step whose
    gradients hold an inf (the scaler's own early overflows, and one inf injected into classifier.weight's
    gradient at iteration ``inject``) changes no parameter and halves the scale; a finite step updates and keeps
    the scale. The step after the injected one updates again (and lowers the loss)."""
    steps, inject = 11, 8
    calls = {"n": 0}

    def inf_on_one_step(grad):
        calls["n"] += 1
        if calls["n"] == inject + 1:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    rec = train_on_one_batch(monkeypatch, tiny_cuhk_root, str(tmp_path / "logs"), "amp_fp16", steps,
                             on_model=lambda m: m.classifier.weight.register_hook(inf_on_one_step))
    assert calls["n"] == steps
    totals = check_losses(rec.losses, steps)
    assert {p.dtype for p in rec.model.parameters()} == {torch.float32}
    assert rec.compute_dtypes == {torch.float16}

    (scaler,) = rec.scalers
    log = scaler.steps
    assert len(log) == steps and all("scale_after" in s for s in log)  # step + update on every iteration
    backoff = scaler.get_backoff_factor()
    for i, s in enumerate(log):
        assert s["updated"] == (not s["nonfinite"]), (i, s)
        assert s["scale_after"] == (s["scale"] * backoff if s["nonfinite"] else s["scale"]), (i, s)
        if i + 1 < steps:
            assert log[i + 1]["scale"] == s["scale_after"]
            if not s["updated"]:  # nothing changed: the same batch gives the same losses
                assert rec.losses[i + 1] == rec.losses[i], i
    assert log[inject]["nonfinite"] and not log[inject]["updated"]
    assert any(s["updated"] for s in log[:inject])  # the injected inf hit a scale that had settled
    assert log[inject + 1]["updated"] and log[inject + 1]["scale"] == log[inject]["scale"] * backoff
    assert totals[inject + 1] == totals[inject] and totals[inject + 2] != totals[inject + 1]  # skipped, then updated
    # the optimizer (AdamW) stepped exactly on the updating iterations
    n_updates = sum(s["updated"] for s in log)
    assert 0 < n_updates < steps
    assert {int(st["step"]) for st in rec.last["optimizer"]["state"].values()} == {n_updates}
    # the log says how many steps were skipped, and the scale they left
    log_text = open(os.path.join(rec.run_dir, "train_log.txt")).read()
    assert (f"Epoch[1] GradScaler: {steps - n_updates} of {steps} steps skipped (inf/NaN gradients), "
            f"scale now {log[-1]['scale_after']:g}") in log_text


def test_optimizer_step_count():
    """The GradScaler's skipped-step count reads the optimizer's own step count: Adam/AdamW count, SGD does not."""
    from processor.processor import optimizer_step_count

    w = nn.Parameter(torch.ones(3))
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        opt = cls([w], lr=0.1)
        assert optimizer_step_count(opt) == 0
        for n in (1, 2):
            w.grad = torch.ones(3)
            opt.step()
            assert optimizer_step_count(opt) == n
    for momentum in (0.0, 0.9):
        opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)
        w.grad = torch.ones(3)
        opt.step()
        assert optimizer_step_count(opt) is None

"""solver: optimizer param groups and lr schedules against the original IRRA's fixtures."""
import json
from argparse import Namespace
from pathlib import Path

import pytest

from utils.options import default_args
import torch
from torch import nn

from solver import LRSchedulerWithWarmup, build_lr_scheduler, build_optimizer

FIX = Path(__file__).parent / "fixtures"


def _args(**kw) -> Namespace:
    base = dict(
        optimizer="Adam", lr=1e-5, lr_factor=5.0, bias_lr_factor=2.0, momentum=0.9, weight_decay=4e-5,
        weight_decay_bias=0.0, alpha=0.9, beta=0.999, num_epoch=60, milestones=(20, 50), gamma=0.1,
        warmup_factor=0.1, warmup_epochs=5, warmup_method="linear", lrscheduler="cosine", target_lr=0.0, power=0.9,
    )
    base.update(kw)
    return default_args(**base)


class SpecModel(nn.Module):
    """Module whose named_parameters() are exactly the IRRA spec names/shapes (in spec order), independent
    of the model code: nested empty modules are created for every dotted prefix."""

    def __init__(self, spec: dict):
        super().__init__()
        for name, shape in spec.items():
            *path, leaf = name.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))


@pytest.fixture(scope="module")
def spec_model():
    spec = json.loads((FIX / "irra_spec.json").read_text())
    model = SpecModel(spec)
    assert [n for n, _ in model.named_parameters()] == list(spec)
    return model


def test_optimizer_groups_match_fixture(spec_model):
    fx = torch.load(FIX / "model_forward.pt", weights_only=True)
    a = fx["args"]
    args = _args(merge_param_groups=False,  # the original's layout: one group per parameter
                 **{k: a[k] for k in ("optimizer", "lr", "lr_factor", "bias_lr_factor", "weight_decay",
                                      "weight_decay_bias", "alpha", "beta", "momentum")})
    opt = build_optimizer(args, spec_model)
    expected = fx["optimizer_groups"]  # [[name, lr, weight_decay], ...] in named_parameters order
    names = [n for n, _ in spec_model.named_parameters()]
    assert len(opt.param_groups) == len(expected) == len(names)
    by_param = {id(p): n for n, p in spec_model.named_parameters()}
    for group, (name, lr, wd) in zip(opt.param_groups, expected):
        assert len(group["params"]) == 1
        assert by_param[id(group["params"][0])] == name
        assert group["lr"] == pytest.approx(lr, rel=1e-12), name
        assert group["weight_decay"] == pytest.approx(wd, abs=1e-15), name
    # the fixture exercises every rule
    lrs = {(lr, wd) for _, lr, wd in expected}
    assert lrs == {(1e-5, 4e-5), (2e-5, 0.0), (5e-5, 4e-5), (5e-5, 0.0)}
    # the default (merged) layout gives every parameter the fixture's lr and weight decay, in 4 groups
    args = args.replace(merge_param_groups=True)
    merged = build_optimizer(args, spec_model)
    assert len(merged.param_groups) == 4
    got = {by_param[id(p)]: (g["lr"], g["weight_decay"]) for g in merged.param_groups for p in g["params"]}
    assert len(got) == len(expected)
    for name, lr, wd in expected:
        assert got[name][0] == pytest.approx(lr, rel=1e-12) and got[name][1] == pytest.approx(wd, abs=1e-15), name


def test_frozen_params_skipped():
    m = nn.Linear(3, 2)
    m.bias.requires_grad_(False)
    opt = build_optimizer(_args(), m)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"][0] is m.weight


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_optimizer_types_read_their_options(name):
    """Each optimizer takes lr, momentum / betas, eps and the per-group rules from the options (values unlike the
    defaults, so that a hard-coded value would show)."""
    m = nn.Linear(3, 2)
    opt = build_optimizer(_args(optimizer=name, lr=3e-4, momentum=0.7, alpha=0.8, beta=0.99, adam_eps=2e-4,
                                adamw_eps=3e-7, bias_lr_factor=3.0, weight_decay=1e-3, weight_decay_bias=2e-4), m)
    if name == "SGD":
        assert type(opt) is torch.optim.SGD
        assert opt.defaults["momentum"] == 0.7 and opt.defaults["lr"] == 3e-4
    else:
        assert type(opt) is (torch.optim.Adam if name == "Adam" else torch.optim.AdamW)
        assert opt.defaults["betas"] == (0.8, 0.99)
        assert opt.defaults["eps"] == (2e-4 if name == "Adam" else 3e-7)
    # weight decay / lr live per group: [weight, bias]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 2e-4]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-4, 9e-4])


@pytest.mark.parametrize("name,eps", [("Adam", 1e-3), ("AdamW", 1e-8)])
def test_default_eps_is_the_originals(name, eps):
    """With the default options the first step moves a weight by lr * g / (|g| + eps) (Adam's bias-corrected first
    step) with the original's eps: 1e-3 for Adam, 1e-8 for AdamW; gradients near eps show it."""
    w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    model = nn.Module()
    model.register_parameter("weight", w)
    opt = build_optimizer(_args(optimizer=name), model)
    g = torch.tensor([1e-3, -2e-3, 5e-4, 1.0], dtype=torch.float64)
    w.grad = g.clone()
    opt.step()
    lr = opt.param_groups[0]["lr"]
    torch.testing.assert_close(w.detach(), -lr * g / (g.abs() + eps), rtol=1e-9, atol=0)


def _train_side_by_side(runs, x: torch.Tensor, steps: int) -> None:
    """``steps`` steps of every (model, optimizer[, scheduler]) in ``runs`` on the same input, in turn."""
    for _ in range(steps):
        for m, o, *sched in runs:
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
            for sc in sched:
                sc.step()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fused_optimizer_option_same_steps(name):
    """--fused_optimizer selects torch's fused kernel; a few steps agree with the default implementation."""
    torch.manual_seed(0)
    ref, fus = nn.Linear(5, 3), nn.Linear(5, 3)
    fus.load_state_dict(ref.state_dict())
    args = _args(optimizer=name, lr=1e-2)
    o_ref = build_optimizer(args, ref)
    args = args.replace(fused_optimizer=True)
    o_fus = build_optimizer(args, fus)
    assert not o_ref.defaults.get("fused") and o_fus.defaults["fused"] is True
    _train_side_by_side(((ref, o_ref), (fus, o_fus)), torch.randn(4, 5), 3)
    for a, b in zip(ref.parameters(), fus.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match=r"--optimizer 'Lamb': unknown; valid: \['SGD', 'Adam', 'AdamW'\]"):
        build_optimizer(_args(optimizer="Lamb"), nn.Linear(2, 2))
    args = _args()
    args = args.replace(optimizer="Lamb")  # set after the options were checked: build_optimizer itself refuses it
    with pytest.raises(ValueError, match=r"unknown optimizer 'Lamb'; valid optimizers: SGD, Adam, AdamW"):
        build_optimizer(args, nn.Linear(2, 2))


def _curve(mode, warmup_method, steps=60):
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1e-5}, {"params": [p2], "lr": 5e-5}], lr=1e-5)
    sched = LRSchedulerWithWarmup(opt, milestones=(20, 50), gamma=0.1, mode=mode, warmup_factor=0.1,
                                  warmup_epochs=5, warmup_method=warmup_method, total_epochs=60, target_lr=0,
                                  power=0.9)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


SCHED = json.loads((FIX / "functions.json").read_text())["scheduler"]


@pytest.mark.parametrize("key", sorted(SCHED))
def test_scheduler_fixture(key):
    mode, method = key.split("/")
    expected = SCHED[key]
    got = _curve(mode, method, len(expected))
    assert len(expected) == 60
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, rel=1e-9, abs=1e-20)


def test_build_lr_scheduler_uses_args():
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1e-5}, {"params": [p2], "lr": 5e-5}], lr=1e-5)
    sched = build_lr_scheduler(_args(lrscheduler="step", warmup_method="constant"), opt)
    assert (sched.mode, sched.warmup_method, sched.total_epochs, sched.milestones) == ("step", "constant", 60, [20, 50])
    got = []
    for _ in range(60):
        got.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for e, g in zip(SCHED["step/constant"], got):
        assert g == pytest.approx(e, rel=1e-9)


def test_scheduler_validation():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="increasing"):
        LRSchedulerWithWarmup(opt, milestones=(50, 20))
    with pytest.raises(ValueError, match="valid modes: step, exp, poly, cosine, linear"):
        LRSchedulerWithWarmup(opt, milestones=(20,), mode="plateau")
    with pytest.raises(ValueError, match="valid methods: constant, linear"):
        LRSchedulerWithWarmup(opt, milestones=(20,), warmup_method="exp")


def test_scheduler_total_equals_warmup_no_crash():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = LRSchedulerWithWarmup(opt, milestones=(20,), mode="cosine", warmup_epochs=2, total_epochs=2)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


class _GroupsModel(nn.Module):
    """Parameters that fall under every lr / weight-decay rule: backbone weight and bias, cross-modal, classifier."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 5)
        self.cross_attn = nn.Linear(5, 5)
        self.classifier = nn.Linear(5, 3)

    def forward(self, x):
        return self.classifier(self.cross_attn(self.backbone(x)).relu())


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_merge_param_groups_same_updates(name):
    """--merge_param_groups: one group per (lr, weight decay), every parameter keeps its lr and decay, and several
    scheduled steps give bitwise the same parameters as the original's one group per parameter."""
    torch.manual_seed(0)
    ref, mer = _GroupsModel(), _GroupsModel()
    mer.load_state_dict(ref.state_dict())
    args = _args(optimizer=name, lr=1e-2, weight_decay=0.1, warmup_epochs=2, num_epoch=6)
    args = args.replace(merge_param_groups=False)
    o_ref = build_optimizer(args, ref)
    args = args.replace(merge_param_groups=True)
    o_mer = build_optimizer(args, mer)
    assert len(o_ref.param_groups) == 6
    # (lr, wd): backbone.weight (lr, wd), the biases but classifier's (lr*2, 0), cross_attn.weight and
    # classifier.weight (lr*5, wd), classifier.bias (lr*5, 0)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in o_mer.param_groups] == [
        (1e-2, 0.1, 1), (2e-2, 0.0, 2), (5e-2, 0.1, 2), (5e-2, 0.0, 1)]
    s_ref, s_mer = build_lr_scheduler(args, o_ref), build_lr_scheduler(args, o_mer)
    _train_side_by_side(((ref, o_ref, s_ref), (mer, o_mer, s_mer)), torch.randn(4, 6), 4)
    for (k, a), b in zip(ref.named_parameters(), mer.parameters()):
        assert torch.equal(a, b), k
    # every parameter is scheduled at the same lr in both layouts
    lr_ref = {id(p): g["lr"] for g in o_ref.param_groups for p in g["params"]}
    lr_mer = {id(p): g["lr"] for g in o_mer.param_groups for p in g["params"]}
    assert [lr_ref[id(p)] for p in ref.parameters()] == [lr_mer[id(p)] for p in mer.parameters()]


def test_resume_with_other_param_groups_names_the_option(tmp_path):
    """A last.pth saved with one param group per parameter does not resume into merged groups: the error names
    the file and --merge_param_groups (and the run can resume with the setting it was saved with)."""
    from processor.setup import resume_checkpoint
    from utils.checkpoint import Checkpointer, OptimizerStateError

    model = _GroupsModel()
    args = _args(merge_param_groups=False)
    opt = build_optimizer(args, model)
    path = Checkpointer(model, opt, build_lr_scheduler(args, opt), save_dir=str(tmp_path)).save("last", epoch=1)
    args = args.replace(merge_param_groups=True)
    merged = build_optimizer(args, model)
    with pytest.raises(OptimizerStateError, match=r"last\.pth: its optimizer state does not fit.*6 saved param "
                                                  r"groups, 4 here.*--no-merge_param_groups"):
        resume_checkpoint(Checkpointer(model, merged, build_lr_scheduler(args, merged)), path)
    with pytest.raises(OptimizerStateError, match=r"6 saved param groups, 4 here") as generic:
        Checkpointer(model, merged, build_lr_scheduler(args, merged)).resume(path)
    assert "merge_param_groups" not in str(generic.value)  # the generic checkpointer knows no solver option
    args = args.replace(merge_param_groups=False)
    same = build_optimizer(args, model)
    assert Checkpointer(model, same, build_lr_scheduler(args, same)).resume(path)["epoch"] == 1


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_merge_param_groups_same_updates_foreach(cls):
    """On a GPU torch's default optimizer implementation is the multi-tensor (foreach) one: merged groups hand it
    many tensors at once, and the updates stay bitwise those of one group per parameter."""
    from solver.build import build_param_groups, merge_param_groups

    torch.manual_seed(0)
    ref, mer = _GroupsModel(), _GroupsModel()
    mer.load_state_dict(ref.state_dict())
    args = _args(lr=1e-2, weight_decay=0.1)
    o_ref = cls(build_param_groups(args, ref), lr=args.lr, eps=1e-3, foreach=True)
    o_mer = cls(merge_param_groups(build_param_groups(args, mer)), lr=args.lr, eps=1e-3, foreach=True)
    assert len(o_mer.param_groups) == 4 < len(o_ref.param_groups)
    _train_side_by_side(((ref, o_ref), (mer, o_mer)), torch.randn(4, 6), 4)
    for (k, a), b in zip(ref.named_parameters(), mer.parameters()):
        assert torch.equal(a, b), k

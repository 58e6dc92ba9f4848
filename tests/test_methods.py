"""Methods as plug-ins: the registry, the option contract (frozen, checked options), the hooks the core calls, and
the worked example of README "Adding a method" (``--method clip_itc``) trained, evaluated and searched end to end."""
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train
from methods.base import Method, TrainHook
from methods.registry import DEFAULT_METHOD, METHODS, get_method, method_options
from model import objectives
from model.build import build_model
from tests.conftest import make_batch, test_script, tiny_train_argv
from utils.options import Options, default_args, get_args, load_config_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def product_files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    return [f for f in out if not f.startswith("tests/")]


# ---------------------------------------------------------------------------------------------- the registry
def test_the_default_method_is_irra_and_an_rde_loss_selects_rde():
    assert DEFAULT_METHOD == "irra" and default_args().method == "irra"
    assert default_args(loss_names="tal").method == "rde"
    assert default_args(loss_names="TAL+sr0.3_tau0.015_margin0.1_n0.2").loss_names == "tal"  # RDE's run_rde.sh
    assert default_args(method="clip_itc").loss_names == "itc"  # the method's default loss


def test_an_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"--method 'nope': unknown; valid: \['irra', 'rde', 'clip_itc'"):
        default_args(method="nope")
    with pytest.raises(SystemExit):
        get_args(["--method", "nope"])


def test_old_configs_without_a_method_still_load(tmp_path):
    """A configs.yaml written before --method existed (an RDE run: its loss names select the method)."""
    cfg = tmp_path / "configs.yaml"
    cfg.write_text("loss_names: tal\nselect_ratio: 0.3\ndataset_name: CUHK-PEDES\n")
    args = load_config_args(str(cfg))
    assert args.method == "rde" and args.select_ratio == 0.3
    assert get_args(["--config", "configs/rde_demo.yaml"]).method == "rde"


def test_every_method_option_group_is_in_the_one_table():
    """Each method's options parse from the command line and are checked where the others are."""
    args = get_args(["--loss_names", "tal", "--tau", "0.02", "--gmm_setting", "precise"])
    assert (args.method, args.tau, args.gmm_setting) == ("rde", 0.02, "precise")
    with pytest.raises(ValueError, match=r"^--tau 0.0: expected > 0"):
        get_args(["--loss_names", "tal", "--tau", "0"])


# ---------------------------------------------------------------------------------------- the option contract
def test_options_are_frozen_once_checked():
    args = default_args()
    assert isinstance(args, Options)
    with pytest.raises(AttributeError, match="read-only"):
        args.lr = 1.0
    with pytest.raises(AttributeError, match="read-only"):
        del args.lr
    changed = args.replace(lr=2.0)
    assert changed.lr == 2.0 and args.lr == 1e-5 and isinstance(changed, Options)
    copy = pickle.loads(pickle.dumps(args))  # DDP workers and loader processes receive it pickled
    assert copy == args and isinstance(copy, Options)
    with pytest.raises(AttributeError):
        copy.lr = 1.0


def test_no_getattr_fallback_on_args_anywhere():
    pattern = re.compile(r"getattr\((self\.)?(args|opts|cfg|a)\s*,\s*[\"'][A-Za-z_]+[\"']\s*,")
    hits = [f"{f}:{i}" for f in product_files() for i, line in
            enumerate(open(os.path.join(REPO, f), encoding="utf-8"), 1) if pattern.search(line)]
    assert hits == []


def test_configs_yaml_is_read_only_through_load_config_args():
    """Product code reads a run's options with utils.options (load_config_args / --config), never the YAML raw."""
    allowed = {"utils/options.py", "utils/iotools.py", "tools/summarize.py"}  # the reader itself; the summary's table
    raw = [f for f in product_files() if f not in allowed
           and re.search(r"\bload_train_configs\(", open(os.path.join(REPO, f), encoding="utf-8").read())]
    assert raw == []


def test_no_magic_class_count():
    hits = [f for f in product_files() if re.search(r"\b11003\b", open(os.path.join(REPO, f), encoding="utf-8")
                                                    .read().replace("TRAIN_IDS = 11003", ""))]
    assert hits == []


def test_one_default_per_option():
    """Every option default is declared once, in the table: no module repeats an option's default as a constant."""
    from utils.options import build_parser

    parser = build_parser()
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    assert len(dests) == len(set(dests))
    # the defaults that used to be copied elsewhere
    hits = [f for f in product_files() if re.search(r"DEFAULT_STRIDE_SIZE|num_classes: int = \d", open(
        os.path.join(REPO, f), encoding="utf-8").read())]
    assert hits == []


# --------------------------------------------------------------------------------------------------- the hooks
class _Recorder(TrainHook):
    def __init__(self):
        self.calls = []

    def before_train(self, state):
        self.calls.append(("before_train", state.start_epoch))

    def before_epoch(self, state):
        self.calls.append(("before_epoch", state.epoch))
        state.train_mode = state.epoch != 2  # epoch 2 trains in eval mode

    def before_step(self, state, batch):
        self.calls.append(("before_step", state.epoch, state.iteration, state.global_step,
                           state.model.training))
        batch["seen"] = torch.ones(1)
        return batch

    def after_step(self, state, outputs):
        self.calls.append(("after_step", sorted(k for k in outputs if k.endswith("loss"))))

    def after_epoch(self, state):
        self.calls.append(("after_epoch", state.epoch))


def test_the_trainer_calls_every_hook_in_order(tiny_cuhk_root, tmp_path, monkeypatch):
    recorder = _Recorder()
    irra = get_method("irra")
    monkeypatch.setattr(type(irra), "train_hooks", lambda self, args: [recorder])
    argv = [a for a in tiny_train_argv(tiny_cuhk_root, str(tmp_path)) if a != "--MLM"]
    train.main(argv + ["--loss_names", "sdm", "--num_epoch", "2"])
    calls = recorder.calls
    per_epoch = sum(1 for c in calls if c[0] == "before_step") // 2
    assert per_epoch >= 1 and calls[0] == ("before_train", 1)
    assert [c for c in calls if c[0] in ("before_epoch", "after_epoch")] == [
        ("before_epoch", 1), ("after_epoch", 1), ("before_epoch", 2), ("after_epoch", 2)]
    steps = [c for c in calls if c[0] == "before_step"]
    assert [s[3] for s in steps] == list(range(2 * per_epoch))  # global steps count across epochs
    assert [s[4] for s in steps] == [True] * per_epoch + [False] * per_epoch  # state.train_mode is the model's mode
    assert all(c == ("after_step", ["sdm_loss"]) for c in calls if c[0] == "after_step")


def test_the_solver_takes_the_method_param_groups(monkeypatch):
    """solver.build_optimizer asks the method: a method's groups are what the optimizer gets."""
    from solver import build_optimizer

    args = default_args(pretrain_choice="scratch:ViT-Micro", img_size=(64, 32), loss_names="sdm")
    model = build_model(args, 4)
    irra = get_method("irra")
    monkeypatch.setattr(type(irra), "param_groups", lambda self, a, m: [
        {"params": [p], "lr": 0.5, "weight_decay": 0.25} for p in m.parameters()])
    opt = build_optimizer(args, model)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.5, 0.25)]


def test_feature_sets_rank_in_the_evaluator(tiny_cuhk_root):
    """The Evaluator ranks every set a method gives, the default unprefixed, without knowing the method."""
    from datasets.build import build_dataloader
    from utils.metrics import Evaluator

    class TwoSets(Method):
        name = "two_sets"
        feature_sets = ("image_only", "mixed")
        default_feature_set = "mixed"

        def encode_images(self, model, images):
            f = model.encode_image(images).float()
            return {"image_only": f, "mixed": f}

        def encode_texts(self, model, text):
            f = model.encode_text(text).float()
            return {"image_only": f, "mixed": -f}

    args = default_args(dataset_name="CUHK-PEDES", root_dir=tiny_cuhk_root, pretrain_choice="scratch:ViT-Micro",
                        img_size=(64, 32), loss_names="sdm", training=False, num_workers=0, test_batch_size=16)
    img_loader, txt_loader, _ = build_dataloader(args)
    torch.manual_seed(0)
    model = build_model(args, 8).eval()
    out = Evaluator(img_loader, txt_loader, method=TwoSets()).eval(model)
    plain = Evaluator(img_loader, txt_loader).eval(model)
    assert {k: out[f"image_only_{k}"] for k in plain} == plain  # the same features rank the same
    assert set(out) == {f"image_only_{k}" for k in plain} | set(plain)
    assert out["R1"] != plain["R1"] or out["mAP"] != plain["mAP"]  # "mixed" (negated text) ranks otherwise


# ----------------------------------------------------------------------------- the worked example: clip_itc
def test_clip_itc_model_is_clip_and_itc():
    """Built with random weights and back-propagated; its loss is compute_itc of its features."""
    args = default_args(method="clip_itc", pretrain_choice="scratch:ViT-Micro", img_size=(64, 32))
    torch.manual_seed(0)
    model = build_model(args, 5)
    batch = make_batch(bs=4, img=(64, 32), varied=True)
    out = model(batch)
    assert set(out) == {"itc_loss", "temperature"}
    with torch.no_grad():
        want = objectives.compute_itc(model.encode_image(batch["images"]), model.encode_text(batch["caption_ids"]),
                                      1 / args.temperature)
    torch.testing.assert_close(out["itc_loss"], want)
    out["itc_loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not hasattr(model, "classifier") and not hasattr(model, "mlm_head")


def test_clip_itc_config_and_its_errors():
    args = get_args(["--config", "configs/clip_itc_demo.yaml"])
    assert (args.method, args.loss_names, args.MLM) == ("clip_itc", "itc", False)
    with pytest.raises(ValueError, match=r"^--loss_names sdm: expected losses of --method clip_itc: \['itc'\]"):
        default_args(method="clip_itc", loss_names="sdm")


@pytest.fixture(scope="module")
def clip_itc_run(tiny_cuhk_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    argv = [a for a in tiny_train_argv(tiny_cuhk_root, str(logs)) if a not in ("--MLM", "sdm+mlm+id", "--loss_names")]
    return train.main(argv + ["--method", "clip_itc", "--num_epoch", "2"])


def test_clip_itc_trains_evaluates_and_searches(clip_itc_run, tiny_cuhk_root):
    """train.py -> configs.yaml with the method -> test.py on its checkpoint (the Evaluator's numbers, recorded) ->
    the Retriever ranks its features."""
    from search.retrieval import Retriever

    run = clip_itc_run["run_dir"]
    args = load_config_args(run)
    assert args.method == "clip_itc" and "method: clip_itc" in open(os.path.join(run, "configs.yaml")).read()
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["epoch"] for m in metrics] == [1, 2]
    got = test_script.main(["--config_file", run, "--checkpoint", os.path.join(run, "last.pth")])
    assert got["R1"] == pytest.approx(metrics[-1]["R1"], abs=1e-6)  # the same model, split (val is test here)
    recorded = json.load(open(os.path.join(run, "test_metrics.json")))
    assert recorded["last.pth"]["R1"] == pytest.approx(got["R1"])
    r = Retriever.from_run(run, os.path.join(run, "last.pth"), device="cpu")
    assert r.method.name == "clip_itc" and r.feature_set == "global"
    q = r.encode_texts(["a person in a red coat"])
    with torch.no_grad():
        want = F.normalize(r.model.encode_text(r.tokenize("a person in a red coat").ids[None]), dim=-1)
    torch.testing.assert_close(q, want)


def test_a_checkpoint_of_another_method_is_refused(clip_itc_run, tiny_cuhk_root, tmp_path):
    """An RDE config cannot evaluate the clip_itc checkpoint (its format is not RDE's): the error names both."""
    run = clip_itc_run["run_dir"]
    cfg = tmp_path / "configs.yaml"
    text = open(os.path.join(run, "configs.yaml")).read().replace("method: clip_itc", "method: rde").replace(
        "loss_names: itc", "loss_names: tal")
    cfg.write_text(text)
    with pytest.raises(ValueError, match=r"checkpoint of --method irra / clip_itc but .* has --method rde"):
        test_script.main(["--config_file", str(cfg), "--checkpoint", os.path.join(run, "last.pth")])

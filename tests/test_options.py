"""Command-line options: the original's names and defaults, typed, plus the config file and cross-checks."""
import pytest

from utils.options import build_parser, get_args, load_config_args

# Every option of the original utils/options.py with its default.
ORIGINAL_DEFAULTS = {
    "name": "baseline", "output_dir": "logs", "log_period": 100, "eval_period": 1, "val_dataset": "test",
    "resume": False, "resume_ckpt_file": "", "pretrain_choice": "ViT-B/16", "temperature": 0.02, "img_aug": False,
    "cmt_depth": 4, "masked_token_rate": 0.8, "masked_token_unchanged_rate": 0.1, "lr_factor": 5.0, "MLM": False,
    "mlm_loss_weight": 1.0, "id_loss_weight": 1.0, "img_size": (384, 128), "stride_size": 16,
    "text_length": 77, "vocab_size": 49408, "optimizer": "Adam", "lr": 1e-5, "bias_lr_factor": 2.0, "momentum": 0.9,
    "weight_decay": 4e-5, "weight_decay_bias": 0.0, "alpha": 0.9, "beta": 0.999, "num_epoch": 60,
    "milestones": (20, 50), "gamma": 0.1, "warmup_factor": 0.1, "warmup_epochs": 5, "warmup_method": "linear",
    "lrscheduler": "cosine", "target_lr": 0, "power": 0.9, "dataset_name": "CUHK-PEDES", "sampler": "random",
    "num_instance": 4, "root_dir": "./data", "batch_size": 128, "test_batch_size": 512, "num_workers": 8,
    "training": True,
}


def test_original_names_and_defaults():
    parsed = vars(build_parser().parse_args([]))
    for k, v in ORIGINAL_DEFAULTS.items():
        assert k in parsed, k
        assert parsed[k] == v or tuple(parsed[k]) == v, (k, parsed[k], v)
    assert get_args([]).loss_names == "sdm+id+mlm"


def test_typed_values_from_the_command_line():
    a = get_args(["--img_size", "192", "64", "--log_period", "7", "--eval_period", "2", "--milestones", "3", "9",
                  "--test"])
    assert a.img_size == (192, 64) and isinstance(a.img_size[0], int)
    assert a.log_period == 7 and a.eval_period == 2 and a.milestones == (3, 9)
    assert a.training is False


def test_mlm_flag_and_loss_names_agree():
    a = get_args(["--loss_names", "sdm+id", "--MLM"])
    assert a.loss_names == "sdm+id+mlm" and a.MLM
    b = get_args(["--loss_names", "sdm+mlm"])
    assert b.MLM is True
    c = get_args(["--loss_names", "sdm+id"])
    assert c.MLM is False and "mlm" not in c.loss_names


def test_unknown_loss_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss\(es\) \['sdn'\].*'itc', 'sdm', 'cmpm', 'id', 'mlm'"):
        get_args(["--loss_names", "sdn+id"])


def test_config_file_gives_defaults_and_command_line_wins(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("batch_size: 16\nimg_size: [96, 32]\nlr: 0.001\n")
    a = get_args(["--config", str(cfg), "--lr", "0.01"])
    assert a.batch_size == 16 and a.img_size == (96, 32) and a.lr == 0.01


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        get_args(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 16\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['batch_sise'\]"):
        get_args(["--config", str(bad)])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        get_args(["--config", str(lst)])


def test_bad_choice_is_rejected(capsys):
    with pytest.raises(SystemExit):
        get_args(["--precision", "fp8"])
    assert "--precision" in capsys.readouterr().err


def test_original_configs_yaml_loads(tmp_path):
    """A configs.yaml written by the original code (python/tuple tags, no new options) rebuilds a full args."""
    (tmp_path / "configs.yaml").write_text(
        "MLM: true\nalpha: 0.9\nbatch_size: 64\nbeta: 0.999\nbias_lr_factor: 2.0\ncmt_depth: 4\n"
        "dataset_name: CUHK-PEDES\ndistributed: false\neval_period: 1\ngamma: 0.1\nid_loss_weight: 1.0\n"
        "img_aug: true\nimg_size: !!python/tuple\n- 384\n- 128\nlocal_rank: 0\nlog_period: 100\n"
        "loss_names: sdm+mlm+id\nlr: 1.0e-05\nlr_factor: 5.0\nlrscheduler: cosine\nmasked_token_rate: 0.8\n"
        "masked_token_unchanged_rate: 0.1\nmilestones: !!python/tuple\n- 20\n- 50\nmlm_loss_weight: 1.0\n"
        "momentum: 0.9\nname: iira\nnum_epoch: 60\nnum_instance: 4\nnum_workers: 8\noptimizer: Adam\n"
        "output_dir: logs/CUHK-PEDES/20220908_072219_iira\npower: 0.9\npretrain_choice: ViT-B/16\n"
        "resume: false\nresume_ckpt_file: ''\nroot_dir: /data0/data_ccq/CUHK-PEDES/\nsampler: random\n"
        "stride_size: 16\ntarget_lr: 0\ntemperature: 0.02\ntest_batch_size: 512\ntext_length: 77\n"
        "training: true\nval_dataset: test\nvocab_size: 49408\nwarmup_epochs: 5\nwarmup_factor: 0.1\n"
        "warmup_method: linear\nweight_decay: 4.0e-05\nweight_decay_bias: 0.0\n")
    a = load_config_args(str(tmp_path / "configs.yaml"), device="cpu")
    assert a.img_size == (384, 128) and a.milestones == (20, 50)
    assert a.name == "iira" and a.loss_names == "sdm+mlm+id" and a.MLM
    assert a.device == "cpu" and a.precision == "auto" and a.seed == 1  # filled from today's defaults
    # ... and as --config it gives the options of a new run: run-state keys dropped, output_dir back to the logs root
    b = get_args(["--config", str(tmp_path / "configs.yaml")])
    assert b.output_dir == "logs" and b.img_size == (384, 128) and b.resume is False and b.training is True


@pytest.mark.parametrize("opt,value,want", [
    ("--temperature", "0", "expected > 0"), ("--text_length", "2", "expected >= 3"),
    ("--stride_size", "0", "expected >= 1"), ("--cmt_depth", "0", "expected >= 1 when the mlm loss is on"),
    ("--batch_size", "0", "expected >= 1"), ("--eval_period", "0", "expected >= 1"),
    ("--lr", "-1", "expected a finite number > 0")])
def test_out_of_range_values_are_rejected(opt, value, want):
    with pytest.raises(ValueError, match=f"{opt} {value}.*{want}"):
        get_args([opt, value, "--loss_names", "sdm+mlm"])

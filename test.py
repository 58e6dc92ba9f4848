"""Evaluate a trained run:  python test.py --config_file logs/<dataset>/<run>/configs.yaml
Works with our configs.yaml and the original IRRA's; loads best.pth from the config's directory by default.
A checkpoint without a run directory (e.g. a method's released weights):
    python test.py --method <name> --checkpoint <file> --dataset_name <D> --root_dir <R> --img_size H W [options]
(train.py's options given, and the method's defaults for the others, stand in for the run's configs.yaml).
The results are also recorded, under the checkpoint's file name, in test_metrics.json next to the checkpoint,
with the dataset and root they were measured on (checked writable before the evaluation starts).

Cross-domain: ``--dataset_name B [--root_dir R]`` evaluates the run (trained on A) on B's test split with the run's
own model options (image size, text length, model); the ID classifier is not used, so B's number of identities does
not matter. The result is recorded as "trained on A, tested on B", beside the in-domain one
(``utils.run_dir.test_metrics_key``).
"""
import argparse
import os
import sys

from datasets import build_dataloader
from methods.registry import get_method
from model.build import build_model_from_checkpoint
from processor.processor import do_inference
from utils.checkpoint import model_state_dict
from utils.choices import DATASETS, EXTRA_METRICS, check_choice, eval_metrics
from utils.cli import run_main
from utils.comm import resolve_device
from utils.env import describe_environment, environment_info
from utils.logger import setup_logger
from utils.options import get_args, load_config_args
from utils.run_dir import (BEST_CHECKPOINT, check_test_metrics_writable, resolve_run, test_metrics_key,
                           write_test_metrics)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="IRRA Test")
    parser.add_argument("--config_file", default=None, help="configs.yaml of a training run, or its run directory")
    parser.add_argument("--checkpoint", default=None, help="default: best.pth next to the config file")
    parser.add_argument("--device", default=None, help="auto | cpu | an accelerator[:N] (default: the run's)")
    parser.add_argument("--root_dir", default=None, help="dataset root (default: the run's)")
    parser.add_argument("--dataset_name", default=None,
                        help=f"evaluate on this dataset's test split (cross-domain; default: the run's), of {list(DATASETS)}")
    parser.add_argument("--anno_file", default=None,
                        help="annotation file of the test dataset (default: the run's on its own dataset, the "
                             "dataset's own on another)")
    parser.add_argument("--metrics", nargs="*", default=None, choices=EXTRA_METRICS, metavar="NAME",
                        help=f"extra metrics of {list(EXTRA_METRICS)} (default: the run's --metrics; mSD always on "
                             f"UFine6926)")
    parser.add_argument("--test_batch_size", type=int, default=None)
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--i2t_metric", action="store_true")
    parser.add_argument("--skip_image_check", action="store_true",
                        help="do not open every test image before evaluating (default: the run's setting)")
    parser.epilog = ("Without --config_file, any option of train.py (--method, --img_size, ...) describes the "
                     "checkpoint; the method's defaults stand for the others.")
    cli, rest = parser.parse_known_args(argv)
    common = dict(device=cli.device, root_dir=cli.root_dir, num_workers=cli.num_workers,
                  test_batch_size=cli.test_batch_size, skip_image_check=cli.skip_image_check or None, training=False)
    if cli.config_file is not None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)} (train.py's options only without --config_file: "
                         f"the run's configs.yaml has them)")
        run_dir, config_file = resolve_run(cli.config_file)
        args = load_config_args(config_file, output_dir=run_dir, **common)
    elif cli.checkpoint is None:
        parser.error("pass --config_file (a training run), or --checkpoint with --method, --dataset_name ... "
                     "(a checkpoint with no run directory)")
    else:  # train.py's option table with the method's defaults; the results go next to the checkpoint
        run_dir = os.path.dirname(os.path.abspath(cli.checkpoint))
        config_file = "the options given"
        given = [f"--dataset_name={cli.dataset_name}"] if cli.dataset_name is not None else []
        args = get_args(rest + given + ["--test"]).replace(
            output_dir=run_dir, **{k: v for k, v in common.items() if v is not None and k != "training"})
    trained_on = args.dataset_name  # without a run directory: the dataset given (the checkpoint's own is unknown)
    if cli.dataset_name is not None:
        check_choice("dataset_name", cli.dataset_name, DATASETS)
        # the run's annotation file belongs to its own dataset
        args = args.replace(dataset_name=cli.dataset_name,
                            anno_file=args.anno_file if cli.dataset_name == trained_on else "")
    if cli.anno_file is not None:
        args = args.replace(anno_file=cli.anno_file)
    metrics = eval_metrics(args.metrics if cli.metrics is None else cli.metrics, args.dataset_name)
    ckpt = cli.checkpoint or os.path.join(run_dir, BEST_CHECKPOINT)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"checkpoint {ckpt} not found (pass --checkpoint PATH)")
    check_test_metrics_writable(ckpt)  # the result can be recorded: checked before minutes of evaluation
    logger = setup_logger("IRRA", save_dir=run_dir, if_train=False)
    logger.info("config %s, checkpoint %s; trained on %s, tested on %s", config_file, ckpt, trained_on,
                args.dataset_name)

    device = resolve_device(args.device)
    logger.info("environment: %s", describe_environment(environment_info(device)))
    # the checkpoint first: an unreadable file or one that does not fit the config fails before the data is read
    checkpoint = get_method(args.method).read_checkpoint(ckpt)  # read once: weights, classes, backbone and epoch
    weights = model_state_dict(checkpoint)
    epoch = checkpoint.get("epoch")  # None in a checkpoint without one (the original's)
    # the backbone is rebuilt from the checkpoint itself (no pretrained CLIP file), its grid checked against the config
    model = build_model_from_checkpoint(args, weights, source=ckpt, config=config_file, device=device)
    test_img_loader, test_txt_loader, _ = build_dataloader(args)
    results = do_inference(model, test_img_loader, test_txt_loader, i2t_metric=cli.i2t_metric or args.i2t_metric,
                           method=get_method(args.method), metrics=metrics)
    key = test_metrics_key(ckpt, args.dataset_name, trained_on)
    recorded = write_test_metrics(ckpt, results, epoch=epoch, split="test", dataset_name=args.dataset_name,
                                  root_dir=os.path.abspath(args.root_dir), trained_on=trained_on, key=key)
    logger.info("results of %s (epoch %s), trained on %s, tested on %s, recorded in %s as %r",
                os.path.basename(ckpt), epoch, trained_on, args.dataset_name, recorded, key)
    return results


if __name__ == "__main__":
    run_main(main, sys.argv[1:], prog="test.py")

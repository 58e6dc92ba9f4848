"""RDE's Consensus Clean Division (CCD): which training pairs are trusted in an epoch.

Before every epoch (:class:`CCDHook`, RDE's training hook, ``before_epoch``):
1. the per-sample losses of both branches (BGE: CLS / EOT features; TSE: selected tokens) over the whole training set,
   without gradients (:func:`per_sample_losses`: the model in eval mode, as RDE, batches of ``--ccd_batch_size`` in a
   fixed order drawn from ``(seed, epoch)``; under DDP each rank takes every world-th batch and the losses are gathered,
   so every rank holds the same vector and the division equals one process's);
2. each branch's losses min-max normalised, a 2-component ``sklearn.mixture.GaussianMixture`` fitted to them
   (``--gmm_setting``: RDE's ``fast`` or ``precise`` values; ``random_state`` from ``(seed, epoch)``), the clean
   probability is the posterior of the lower-mean component (:func:`gmm_clean_prob`);
3. :func:`split_prob` at 0.5 with NCR's rule;
4. consensus (:func:`consensus_labels`): both branches clean -> 1, both noisy -> 0, otherwise a coin flip drawn from
   ``(seed, epoch)``.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from methods.base import TrainHook, TrainState
from methods.rde.options import GMM_SETTINGS
from utils.comm import is_main_process
from utils.run_dir import append_metrics, drop_metrics_from, records_file

logger = logging.getLogger("IRRA.ccd")

CCD_FILE = records_file("ccd")  # one line per epoch with CCD's clean / noisy split
SPLIT_THRESHOLD = 0.5  # RDE's split_prob threshold
NCR_FORCED_FRACTION = 100  # NCR: when nothing is below the threshold, the lowest 1/100 are taken as noisy
# streams of the (seed, epoch) draws of CCD
STREAM_GMM, STREAM_COIN, STREAM_ORDER = 1, 2, 3


def ccd_seed(seed: int, epoch: int, stream: int) -> int:
    """A 31-bit seed from ``(seed, epoch, stream)`` (a hash: neighbouring epochs are unrelated)."""
    digest = hashlib.blake2b(f"ccd/{seed}/{epoch}/{stream}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & (2 ** 31 - 1)


def split_prob(prob, threshld: float):
    """RDE's (NCR's) split: prob [N] clean probabilities -> int array [N], 1 where ``prob > threshld``.

    If every probability is above ``threshld`` (nothing estimated noisy), the threshold becomes the
    ``len(prob) // 100``-th smallest probability, so about the lowest 1 % are taken as noisy.
    """
    prob = np.asarray(prob)
    if prob.min() > threshld:
        logger.info("no estimated noisy data: the 1/100 of the data with the smallest probability is taken as noisy")
        threshld = np.sort(prob)[len(prob) // NCR_FORCED_FRACTION]
    pred = prob > threshld
    return pred + 0


def min_max_normalise(losses: torch.Tensor) -> torch.Tensor:
    """[N] -> [N] scaled to [0, 1] (RDE's normalisation; a constant vector gives zeros instead of 0/0)."""
    losses = losses.double()
    span = losses.max() - losses.min()
    if span <= 0:
        return torch.zeros_like(losses)
    return (losses - losses.min()) / span


def gmm_clean_prob(losses, setting: str = "fast", random_state: Optional[int] = None) -> np.ndarray:
    """Per-sample clean probability: losses [N] (already normalised) -> [N], the posterior of the lower-mean
    component of a 2-component GaussianMixture fitted with RDE's ``setting`` (``fast`` / ``precise``)."""
    from sklearn.mixture import GaussianMixture

    if setting not in GMM_SETTINGS:
        raise ValueError(f"--gmm_setting {setting!r}: unknown; valid: {list(GMM_SETTINGS)}")
    x = np.asarray(losses, dtype=np.float64).reshape(-1, 1)  # [N] -> [N, 1]
    gmm = GaussianMixture(n_components=2, random_state=random_state, **GMM_SETTINGS[setting])
    gmm.fit(x)
    prob = gmm.predict_proba(x)  # [N, 2]
    return prob[:, gmm.means_.argmin()]


def consensus_labels(pred_a, pred_b, generator: torch.Generator) -> torch.Tensor:
    """RDE's consensus: pred_a, pred_b [N] in {0, 1} -> label_hat [N] float: 1 where both are 1, 0 where both are 0,
    and a fair coin (drawn from ``generator``) where they disagree."""
    division = torch.as_tensor(np.asarray(pred_a), dtype=torch.long) + torch.as_tensor(np.asarray(pred_b),
                                                                                        dtype=torch.long)
    disagree = division == 1
    division[disagree] += torch.randint(0, 2, (int(disagree.sum()),), generator=generator)
    return (division > 1).float()


def clean_set_scores(label_hat: torch.Tensor, real) -> Dict[str, float]:
    """Precision and recall of the selected clean set (label_hat == 1) against the true correspondences ``real``."""
    sel = label_hat.numpy().astype(bool)
    real = np.asarray(real).astype(bool)
    tp = int((sel & real).sum())
    return {"clean_precision": tp / max(int(sel.sum()), 1), "clean_recall": tp / max(int(real.sum()), 1)}


def divide(loss_a: torch.Tensor, loss_b: torch.Tensor, seed: int, epoch: int, setting: str = "fast",
           real: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Steps 2-4 of CCD on the per-sample losses loss_a, loss_b [N] of the two branches -> (label_hat [N] float,
    stats: the counts of each split and, with ``real``, the clean set's precision / recall)."""
    state = ccd_seed(seed, epoch, STREAM_GMM)
    prob_a = gmm_clean_prob(min_max_normalise(loss_a).numpy(), setting, random_state=state)
    prob_b = gmm_clean_prob(min_max_normalise(loss_b).numpy(), setting, random_state=state)
    pred_a, pred_b = split_prob(prob_a, SPLIT_THRESHOLD), split_prob(prob_b, SPLIT_THRESHOLD)
    gen = torch.Generator().manual_seed(ccd_seed(seed, epoch, STREAM_COIN))
    label_hat = consensus_labels(pred_a, pred_b, gen)
    stats = {"clean_bge": int(pred_a.sum()), "clean_tse": int(pred_b.sum()),
             "agree_clean": int(((pred_a + pred_b) == 2).sum()), "agree_noisy": int(((pred_a + pred_b) == 0).sum()),
             "clean": int(label_hat.sum()), "total": int(label_hat.numel())}
    if real is not None:
        stats.update(clean_set_scores(label_hat, real))
    return label_hat, stats


def ccd_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order [N] in which CCD's loss pass visits the training set in ``epoch`` (a permutation from (seed, epoch))."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(ccd_seed(seed, epoch, STREAM_ORDER)))


@torch.no_grad()
def per_sample_losses(model, dataset, batch_size: int, seed: int, epoch: int, num_workers: int = 0,
                      precision: str = "fp32") -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 1 of CCD: the per-sample losses (lossA [N] BGE, lossB [N] TSE, float32 on the CPU, in dataset order) of
    every training pair, the model in eval mode and without gradients (RDE's ``get_loss``; the training augmentation of
    the dataset's current epoch stays on, as RDE).

    Batches of ``batch_size`` in the order :func:`ccd_order` ``(seed, epoch)``; a pair's loss uses the other pairs of
    its batch as negatives. Under DDP rank r takes batches r, r + world, ... and the losses are gathered, so every rank
    returns the same vectors, equal to one process's.
    """
    from torch.utils.data import DataLoader

    from datasets.build import collate
    from utils.comm import all_gather, autocast_context, get_rank, get_world_size, unwrap_model

    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    n = len(dataset)
    order = ccd_order(n, seed, epoch)
    world, rank = get_world_size(), get_rank()
    batches = [order[s:s + batch_size].tolist() for s in range(0, n, batch_size)][rank::world]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.type != "cpu")
    idx, la, lb = [], [], []
    try:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast_context(precision, device):
                loss_a, loss_b, _, _ = net.compute_per_loss(batch)
            idx.append(batch["index"].cpu())
            la.append(loss_a.float().cpu())
            lb.append(loss_b.float().cpu())
    finally:
        net.train(was_training)
    local = (torch.cat(idx) if idx else torch.empty(0, dtype=torch.long),
             torch.cat(la) if la else torch.empty(0), torch.cat(lb) if lb else torch.empty(0))
    parts = all_gather(local) if world > 1 else [local]
    loss_a, loss_b = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    for i, a, b in parts:
        loss_a[i], loss_b[i] = a, b
    if bool(torch.isnan(loss_a).any() | torch.isnan(loss_b).any()):
        raise FloatingPointError(f"CCD epoch {epoch}: a per-sample loss is missing or NaN "
                                 f"({int(torch.isnan(loss_a).sum())} BGE, {int(torch.isnan(loss_b).sum())} TSE)")
    return loss_a, loss_b


def run_ccd(model, dataset, args, epoch: int) -> Tuple[torch.Tensor, Dict[str, float]]:
    """CCD before ``epoch``: (label_hat [N] float on the CPU, stats incl. the seconds taken); logs the split and,
    when the dataset knows its true correspondences, the clean set's precision / recall."""
    import time
    start = time.time()
    batch_size = args.ccd_batch_size or args.batch_size
    loss_a, loss_b = per_sample_losses(model, dataset, batch_size, args.seed, epoch, args.num_workers, args.precision)
    t_losses = time.time() - start
    real = getattr(dataset, "real_correspondences", None)
    label_hat, stats = divide(loss_a, loss_b, args.seed, epoch, args.gmm_setting, real)
    stats["seconds_losses"] = round(t_losses, 3)
    stats["seconds"] = round(time.time() - start, 3)
    msg = (f"CCD epoch {epoch}: clean {stats['clean']} / {stats['total']} (BGE {stats['clean_bge']}, TSE "
           f"{stats['clean_tse']}, both clean {stats['agree_clean']}, both noisy {stats['agree_noisy']})")
    if "clean_precision" in stats:
        msg += f", clean-set precision {stats['clean_precision']:.4f} recall {stats['clean_recall']:.4f}"
    logger.info(msg + f" [{stats['seconds']:.1f} s, losses {t_losses:.1f} s]")
    return label_hat, stats


class CCDHook(TrainHook):
    """RDE's part in the training loop: CCD before every epoch (``ccd.jsonl`` records its split), the consensus
    labels into every batch as ``batch["label_hat"]`` (looked up by the batch's sample ``index``), and the epoch
    trained in eval mode with ``--rde_train_eval_mode`` (RDE's published behaviour)."""

    def __init__(self) -> None:
        self.label_hat: Optional[torch.Tensor] = None

    def before_train(self, state: TrainState) -> None:
        if is_main_process():
            drop_metrics_from(state.output_dir, state.start_epoch, CCD_FILE)  # epochs redone on resume

    def before_epoch(self, state: TrainState) -> None:
        label_hat, stats = run_ccd(state.model, state.train_loader.dataset, state.args, state.epoch)
        if is_main_process():
            append_metrics(state.output_dir, {"epoch": state.epoch, **stats}, CCD_FILE)
        self.label_hat = label_hat.to(next(state.model.parameters()).device)
        state.train_mode = not state.args.rde_train_eval_mode

    def before_step(self, state: TrainState, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        batch["label_hat"] = self.label_hat[batch["index"]]
        return batch

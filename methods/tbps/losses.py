"""TBPS-CLIP's losses as pure functions (``model/tbps_model.py:CLIP.forward`` / ``calc_contrastive`` and
``model/loss.py:compute_simclr_loss``), same names, signatures and numbers.

Shapes: B = rows (the query side: this process's samples in TBPS; the global batch here), N = columns (the gathered
batch), D = feature width. Image / text features are L2-normalised unless said otherwise; ``logit_scale`` is the
(clamped) exp of the learned log-scale, a 0-d tensor or a float.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

Scale = Union[torch.Tensor, float]


def sim_targets_from_ids(ids: torch.Tensor, ids_gathered: torch.Tensor) -> torch.Tensor:
    """ids [B], ids_gathered [N] -> [B, N] float: 1 where the identities are equal, each row divided by its sum."""
    pos_idx = torch.eq(ids.view(-1, 1), ids_gathered.view(1, -1)).float()  # [B, N]
    return pos_idx / pos_idx.sum(1, keepdim=True)


def calc_contrastive(image_features: torch.Tensor, text_features: torch.Tensor, image_features_s: torch.Tensor,
                     text_features_s: torch.Tensor, image_features_gathered: torch.Tensor,
                     text_features_gathered: torch.Tensor, image_features_s_gathered: torch.Tensor,
                     text_features_s_gathered: torch.Tensor, sim_targets: torch.Tensor, alpha: float,
                     logit_scale: Scale) -> torch.Tensor:
    """N-ITC: cross-entropy of ``logit_scale * cos`` against soft targets, image->text and text->image averaged.

    Args:
        image_features, text_features: [B, D] (with gradient).
        image_features_s, text_features_s: [B, D] no-gradient twins (the targets' similarities).
        *_gathered: [N, D], the columns.
        sim_targets: [B, N], rows summing to 1 (:func:`sim_targets_from_ids`).
        alpha: weight of the model's own softmax in the targets:
            ``alpha * softmax(logit_scale * s_i @ s_t^T) + (1 - alpha) * sim_targets`` (no gradient).
    Returns:
        0-d: (mean_i CE_i2t + mean_t CE_t2i) / 2.
    """
    with torch.no_grad():
        sim_i2t_s = logit_scale * image_features_s @ text_features_s_gathered.t()  # [B, N]
        sim_t2i_s = logit_scale * text_features_s @ image_features_s_gathered.t()  # [B, N]
        sim_i2t_targets = alpha * F.softmax(sim_i2t_s, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_s, dim=1) + (1 - alpha) * sim_targets  # soft + hard
    sim_i2t = logit_scale * image_features @ text_features_gathered.t()  # [B, N]
    sim_t2i = logit_scale * text_features @ image_features_gathered.t()  # [B, N]
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def compute_simclr_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, logits_a_gathered: torch.Tensor,
                        logits_b_gathered: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SS (SimCLR's NT-Xent) between two views' normalised projections.

    Args:
        logits_a, logits_b: [B, d] the two views of this side's samples.
        logits_a_gathered, logits_b_gathered: [N, d] the columns.
        labels: [B] long, the column of each row's own sample (the other view of it is the positive; its own view
            is masked out of the a-a / b-b similarities).
    Returns:
        0-d: (CE over [a-b | a-a] + CE over [b-a | b-b]) / 2, logits divided by ``temperature``.
    """
    sim_aa = logits_a @ logits_a_gathered.t() / temperature  # [B, N]
    sim_ab = logits_a @ logits_b_gathered.t() / temperature
    sim_ba = logits_b @ logits_a_gathered.t() / temperature
    sim_bb = logits_b @ logits_b_gathered.t() / temperature
    masks = torch.where(F.one_hot(labels, logits_a_gathered.size(0)) == 0, 0, float("-inf"))  # [B, N]
    sim_aa = sim_aa + masks
    sim_bb = sim_bb + masks
    sim_a = torch.cat([sim_ab, sim_aa], 1)  # [B, 2N]
    sim_b = torch.cat([sim_ba, sim_bb], 1)  # [B, 2N]
    loss_a = F.cross_entropy(sim_a, labels)
    loss_b = F.cross_entropy(sim_b, labels)
    return (loss_a + loss_b) * 0.5


def compute_citc(image_features_gathered: torch.Tensor, text_features_gathered: torch.Tensor, logit_scale: Scale,
                 lambda1: float = 0.25, lambda2: float = 0.25) -> torch.Tensor:
    """C-ITC (cyclic consistency, CyCLIP): over the gathered [N, D] features,
    ``lambda1 * mean((S_ii - S_tt)^2) + lambda2 * mean((S_it - S_ti)^2)``, S = logit_scale * cos, divided by
    logit_scale^2 (TBPS's order of operations). Returns 0-d."""
    i, t = image_features_gathered, text_features_gathered
    logits_image_per_image = logit_scale * i @ i.t()  # [N, N]
    logits_text_per_text = logit_scale * t @ t.t()
    inmodal = (logits_image_per_image - logits_text_per_text).square().mean() / (logit_scale * logit_scale)
    logits_text_per_image = logit_scale * i @ t.t()
    logits_image_per_text = logit_scale * t @ i.t()
    crossmodal = (logits_text_per_image - logits_image_per_text).square().mean() / (logit_scale * logit_scale)
    return lambda1 * inmodal + lambda2 * crossmodal


def compute_ritc(image_features: torch.Tensor, text_features: torch.Tensor, image_features_gathered: torch.Tensor,
                 text_features_gathered: torch.Tensor, sim_targets: torch.Tensor, logit_scale: Scale,
                 eps: float = 1e-2) -> torch.Tensor:
    """R-ITC: ``F.kl_div(log(sim_targets + eps), log_softmax(S), log_target=True, reduction='batchmean')`` for
    S = image [B, D] vs gathered text [N, D] and text vs gathered image, averaged. As TBPS passes the arguments, this
    is KL(model || targets + eps) (the "reverse" KL; the smoothed targets do not sum to 1). Returns 0-d."""
    logits_per_image = logit_scale * image_features @ text_features_gathered.t()  # [B, N]
    logits_per_text = logit_scale * text_features @ image_features_gathered.t()  # [B, N]
    img_log = F.log_softmax(logits_per_image, dim=1)
    txt_log = F.log_softmax(logits_per_text, dim=1)
    target_log = (sim_targets + eps).log()
    kl_img = F.kl_div(target_log, img_log, log_target=True, reduction="batchmean")
    kl_txt = F.kl_div(target_log, txt_log, log_target=True, reduction="batchmean")
    return 0.5 * (kl_img + kl_txt)


def compute_id(image_logits: torch.Tensor, text_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """ID loss: classifier logits [B, C] of the (unnormalised) image and text features, labels [B];
    (CE_image + CE_text) / 2. Returns 0-d."""
    return (F.cross_entropy(image_logits, ids) + F.cross_entropy(text_logits, ids)) / 2

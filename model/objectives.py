"""IRRA losses (pure functions). B = batch size, D = feature dim, C = classes, V = vocabulary, M = tokens."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.rde.options import LOSS_TYPES

Scale = Union[float, torch.Tensor]


def _matching_kl(image_proj_text: torch.Tensor, text_proj_image: torch.Tensor, label_dist: torch.Tensor,
                 epsilon: float) -> torch.Tensor:
    """KL(softmax(logits) || label_dist) per row, averaged over rows, summed over both directions (SDM and CMPM).

    image_proj_text [B, B] (i2t logits), text_proj_image [B, B] (t2i logits), label_dist [B, B] -> scalar.
    """
    i2t_pred = F.softmax(image_proj_text, dim=1)
    i2t_loss = i2t_pred * (F.log_softmax(image_proj_text, dim=1) - torch.log(label_dist + epsilon))
    t2i_pred = F.softmax(text_proj_image, dim=1)
    t2i_loss = t2i_pred * (F.log_softmax(text_proj_image, dim=1) - torch.log(label_dist + epsilon))
    return torch.mean(torch.sum(i2t_loss, dim=1)) + torch.mean(torch.sum(t2i_loss, dim=1))


def compute_sdm(image_features: torch.Tensor, text_features: torch.Tensor, pid: torch.Tensor, logit_scale: Scale,
                image_id: Optional[torch.Tensor] = None, factor: float = 0.3, epsilon: float = 1e-8) -> torch.Tensor:
    """Similarity Distribution Matching loss (IRRA eq. 3-5).

    image_features [B, D], text_features [B, D], pid [B], image_id [B] or None -> scalar.
    Matching (same pid) pairs form the true distribution; with ``image_id`` pairs of the same pid but another
    image get weight ``factor`` (same image weight 1). KL(pred || true) in both directions, summed.
    """
    batch_size = image_features.shape[0]
    pid = pid.reshape((batch_size, 1))  # [B] -> [B, 1]
    pid_dist = pid - pid.t()
    labels = (pid_dist == 0).float()
    if image_id is not None:
        image_id = image_id.reshape((-1, 1))  # [B] -> [B, 1]
        image_id_dist = image_id - image_id.t()
        image_id_mask = (image_id_dist == 0).float()
        labels = (labels - image_id_mask) * factor + image_id_mask

    image_norm = image_features / image_features.norm(dim=1, keepdim=True)
    text_norm = text_features / text_features.norm(dim=1, keepdim=True)

    t2i_cosine_theta = text_norm @ image_norm.t()
    i2t_cosine_theta = t2i_cosine_theta.t()

    text_proj_image = logit_scale * t2i_cosine_theta
    image_proj_text = logit_scale * i2t_cosine_theta

    # labels / labels.sum(dim=1) broadcasts over columns as in the original (labels are symmetric).
    labels_distribute = labels / labels.sum(dim=1)

    return _matching_kl(image_proj_text, text_proj_image, labels_distribute, epsilon)


def compute_mlm(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked language modelling loss: scores [M, V], labels [M] (0 = not masked, ignored) -> scalar."""
    ce = nn.CrossEntropyLoss(ignore_index=0)
    return ce(scores, labels)


def compute_itc(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Scale) -> torch.Tensor:
    """InfoNCE / CLIP contrastive loss: image_features [B, D], text_features [B, D] -> scalar (i2t + t2i) / 2."""
    batch_size = image_features.shape[0]
    labels = torch.arange(start=0, end=batch_size, dtype=torch.int64, device=image_features.device)

    image_norm = image_features / image_features.norm(dim=-1, keepdim=True)
    text_norm = text_features / text_features.norm(dim=-1, keepdim=True)

    logits_per_image = logit_scale * image_norm @ text_norm.t()  # [B, B]
    logits_per_text = logits_per_image.t()

    loss_i = F.cross_entropy(logits_per_image, labels)
    loss_t = F.cross_entropy(logits_per_text, labels)
    return (loss_i + loss_t) / 2


def compute_id(image_logits: torch.Tensor, text_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Identity classification loss: image_logits [B, C], text_logits [B, C], labels [B] -> scalar."""
    criterion = nn.CrossEntropyLoss(reduction="mean")
    return (criterion(image_logits, labels) + criterion(text_logits, labels)) / 2


def compute_cmpm(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, labels: torch.Tensor,
                 epsilon: float = 1e-8) -> torch.Tensor:
    """Cross-Modal Projection Matching loss (Zhang & Lu, ECCV 2018).

    image_embeddings [B, D], text_embeddings [B, D], labels [B] -> scalar.
    """
    batch_size = image_embeddings.shape[0]
    labels_reshape = torch.reshape(labels, (batch_size, 1))  # [B] -> [B, 1]
    labels_dist = labels_reshape - labels_reshape.t()
    labels_mask = (labels_dist == 0).float()

    image_norm = image_embeddings / image_embeddings.norm(dim=1, keepdim=True)
    text_norm = text_embeddings / text_embeddings.norm(dim=1, keepdim=True)
    image_proj_text = torch.matmul(image_embeddings, text_norm.t())
    text_proj_image = torch.matmul(text_embeddings, image_norm.t())

    # normalize the true matching distribution (row norms broadcast over columns, as the original)
    labels_mask_norm = labels_mask / labels_mask.norm(dim=1)

    return _matching_kl(image_proj_text, text_proj_image, labels_mask_norm, epsilon)


# ---------------------------------------------------------------------------------------------------------------
# RDE (Qin et al., CVPR 2024, "Noisy-Correspondence Learning for Text-to-Image Person Re-identification"): per-sample
# losses over a text x image cosine matrix ``scores`` [B, B] (rows are texts, columns images; ``scores[i, i]`` is
# pair i). Names and positional parameters as RDE's ``model/objectives.py``.
# ---------------------------------------------------------------------------------------------------------------

# RDE's loss types (``compute_per_loss(loss_type=...)``), in RDE's spelling: the values of its one loss-name table.
RDE_LOSS_TYPES = tuple(LOSS_TYPES.values())
# RDE clamps the sum of exp(S / tau) over the negatives before its log (fp16 overflow guard); kept for the numbers.
TAL_NEG_SUM_MAX = 10e35


def _same_pid(scores: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
    """pid [B] -> [B, B] float, 1 where text i and image j share the identity (on ``scores``' device)."""
    pid = pid.reshape((-1, 1)).to(scores.device)  # [B] -> [B, 1]
    return (pid - pid.t() == 0).to(scores.dtype)


def _positive_attention(scores: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """alpha [B, B]: softmax of ``scores / tau`` over each row's positives (``labels``), detached (RDE's alpha)."""
    w = (scores / tau).exp() * labels
    return (w / w.sum(dim=1, keepdim=True)).detach()


def compute_TAL_per(scores: torch.Tensor, pid: torch.Tensor, tau: float, margin: float) -> torch.Tensor:
    """Triplet Alignment Loss per sample (RDE eq. 9): scores [B, B] (texts x images), pid [B] -> [B].

    For each direction (text -> images: rows; image -> texts: columns):
    ``[margin - sum_pos alpha * S + tau * log sum_neg exp(S / tau)]_+`` with alpha = softmax over the positives of
    ``S / tau`` (detached); the two directions are summed.
    """
    labels = _same_pid(scores, pid)
    mask = 1 - labels
    alpha_i2t = _positive_attention(scores, labels, tau)
    alpha_t2i = _positive_attention(scores.t(), labels, tau)
    neg_1 = tau * ((scores / tau).exp() * mask).sum(1).clamp(max=TAL_NEG_SUM_MAX).log()
    neg_2 = tau * ((scores.t() / tau).exp() * mask).sum(1).clamp(max=TAL_NEG_SUM_MAX).log()
    loss_1 = (-(alpha_i2t * scores).sum(1) + neg_1 + margin).clamp(min=0)
    loss_2 = (-(alpha_t2i * scores.t()).sum(1) + neg_2 + margin).clamp(min=0)
    return loss_1 + loss_2


def compute_TRL_per(scores: torch.Tensor, pid: torch.Tensor, margin: float = 0.2, tau: float = 0.02) -> torch.Tensor:
    """Triplet Ranking Loss with the hardest negative, per sample: scores [B, B], pid [B] -> [B].

    ``[margin + max_neg S - sum_pos alpha * S]_+`` in both directions, alpha as in :func:`compute_TAL_per`. As RDE,
    the hardest negative is the max of ``mask * S`` (positives count as 0 there).
    """
    labels = _same_pid(scores, pid)
    mask = 1 - labels
    pos_1 = (_positive_attention(scores, labels, tau) * scores).sum(1)
    pos_2 = (_positive_attention(scores.t(), labels, tau) * scores.t()).sum(1)
    neg_1 = (mask * scores).max(1)[0]
    neg_2 = (mask * scores.t()).max(1)[0]
    return (margin + neg_1 - pos_1).clamp(min=0) + (margin + neg_2 - pos_2).clamp(min=0)


def compute_InfoNCE_per(scores: torch.Tensor, logit_scale: Scale) -> torch.Tensor:
    """InfoNCE per sample: scores [B, B] -> [B], ``(-log p_i2t[i, i] - log p_t2i[i, i]) / 2`` (pair i = diagonal)."""
    logits_per_image = logit_scale * scores
    logits_per_text = logits_per_image.t()
    p1 = F.softmax(logits_per_image, dim=1)
    p2 = F.softmax(logits_per_text, dim=1)
    return (-p1.diag().log() - p2.diag().log()) / 2


def compute_sdm_per(scores: torch.Tensor, pid: torch.Tensor, logit_scale: Scale, epsilon: float = 1e-8
                    ) -> torch.Tensor:
    """SDM (IRRA's similarity distribution matching) per sample: scores [B, B] (texts x images), pid [B] -> [B]:
    row i's KL in the image->text direction plus row i's in the text->image direction (not averaged)."""
    labels = _same_pid(scores, pid)
    text_proj_image = logit_scale * scores
    image_proj_text = logit_scale * scores.t()
    labels_distribute = labels / labels.sum(dim=1)  # broadcast over columns as RDE / IRRA (labels are symmetric)
    i2t_pred = F.softmax(image_proj_text, dim=1)
    i2t_loss = i2t_pred * (F.log_softmax(image_proj_text, dim=1) - torch.log(labels_distribute + epsilon))
    t2i_pred = F.softmax(text_proj_image, dim=1)
    t2i_loss = t2i_pred * (F.log_softmax(text_proj_image, dim=1) - torch.log(labels_distribute + epsilon))
    return torch.sum(i2t_loss, dim=1) + torch.sum(t2i_loss, dim=1)


def rde_loss_type(loss_type: str) -> str:
    """``loss_type`` if it is one of RDE's loss types, else a ValueError listing them (RDE matched by substring,
    'TAL' in 'TAL+sr0.3...', and called ``exit()``; its run-name suffix is dropped when the options are read)."""
    if loss_type not in RDE_LOSS_TYPES:
        raise ValueError(f"RDE loss_type {loss_type!r}: unknown; valid: {list(RDE_LOSS_TYPES)}")
    return loss_type


def compute_per_loss(image_features: torch.Tensor, text_features: torch.Tensor, pid: torch.Tensor, tau: float = 0.02,
                     margin: float = 0.2, loss_type: str = "TAL", logit_scale: Scale = 50):
    """Per-sample RDE loss of matched pairs: image_features [B, D], text_features [B, D], pid [B] ->
    ``(per_loss [B], diag [B])``, diag = the cosine of each matched pair. ``loss_type``: one of RDE_LOSS_TYPES."""
    image_norm = image_features / image_features.norm(dim=-1, keepdim=True)
    text_norm = text_features / text_features.norm(dim=-1, keepdim=True)
    scores = text_norm @ image_norm.t()  # [B, B], rows are texts
    kind = rde_loss_type(loss_type)
    if kind == "TAL":
        per_loss = compute_TAL_per(scores, pid, tau, margin=margin)
    elif kind == "TRL":
        per_loss = compute_TRL_per(scores, pid, tau=tau, margin=margin)
    elif kind == "InfoNCE":
        per_loss = compute_InfoNCE_per(scores, logit_scale)
    else:
        per_loss = compute_sdm_per(scores, pid, logit_scale)
    return per_loss, scores.diag()


def compute_rbs(i_feats: torch.Tensor, t_feats: torch.Tensor, i_tse_f: torch.Tensor, t_tse_f: torch.Tensor,
                pid: torch.Tensor, label_hat: Optional[torch.Tensor] = None, tau: float = 0.02, margin: float = 0.1,
                loss_type: str = "TAL", logit_scale: Scale = 50):
    """RDE's robust loss of both branches: BGE features i_feats / t_feats [B, D], TSE features i_tse_f / t_tse_f
    [B, D'], pid [B], label_hat [B] (1 = consensus clean, 0 = noisy; None = all clean) -> ``(loss_bge, loss_tse)``.

    Per-sample losses weighted by ``label_hat``; reduced as RDE: a sum over samples for TAL and TRL, the
    label_hat-weighted mean for InfoNCE and SDM (a batch without any clean pair gives 0/0 there, as RDE).
    """
    loss_bge, _ = compute_per_loss(i_feats, t_feats, pid, tau, margin, loss_type, logit_scale)
    loss_tse, _ = compute_per_loss(i_tse_f, t_tse_f, pid, tau, margin, loss_type, logit_scale)
    if label_hat is None:
        label_hat = torch.ones_like(loss_bge)
    label_hat = label_hat.to(loss_bge.dtype)
    loss_bge = (label_hat * loss_bge).sum()
    loss_tse = (label_hat * loss_tse).sum()
    if rde_loss_type(loss_type) in ("TAL", "TRL"):
        return loss_bge, loss_tse
    return loss_bge / label_hat.sum(), loss_tse / label_hat.sum()

"""IRRA losses (pure functions). B = batch size, D = feature dim, C = classes, V = vocabulary, M = tokens."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

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

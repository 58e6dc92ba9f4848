"""RDE's Token Selection Embedding (TSE) layers (Qin et al., CVPR 2024), with RDE's names and state-dict keys.

The TSE branch re-embeds the tokens the backbone attended to most: from the last block's head-averaged attention,
the image layer takes the CLS row's top ``ratio`` patches, the text layer the EOT row's top tokens (SOT, EOT and
padding masked); each selected token is L2-normalised, mapped by a linear layer plus a 2-layer MLP with BatchNorm,
and the tokens are max-pooled into one feature.

What differs from RDE's code, numbers otherwise identical (tested against RDE's outputs):
- the attention tensors given are never written into (RDE overwrote columns of them in place);
- no ``.half()`` casts: the input follows each layer's weight dtype (fp32 or the converted fp16 weights);
- the input width is a parameter derived from the backbone by the model (RDE hard-codes 512 -> 1024);
- the MLP's BatchNorm layers are :class:`GlobalBatchNorm1d`: under DDP in train mode they normalise over the global
  batch (all ranks' tokens), so N processes train as one process on the whole batch; otherwise nn.BatchNorm1d.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from utils.comm import get_world_size


def differentiable_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks, the gradient summed over all ranks in backward (torch's functional collective;
    torch.distributed.nn.functional.all_reduce does the same but is deprecated). Runs on gloo and NCCL alike."""
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", dist.group.WORLD))


def l2norm(X: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """X / (||X||_2 along ``dim`` + eps) (RDE's / VSE-infinity's, eps added to the norm)."""
    norm = torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt() + eps
    return torch.div(X, norm)


def maxk(x: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """The ``k`` largest values of ``x`` along ``dim`` (in descending order)."""
    index = x.topk(k, dim=dim)[1]
    return x.gather(dim, index)


def maxk_pool1d(x: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values along ``dim``."""
    return maxk(x, dim, k).mean(dim)


def maxk_pool1d_var(x: torch.Tensor, dim: int, k: int, lengths: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
    """x [B, N, D] -> [B, D]: for row b, the mean of the ``min(k, lengths[b])`` largest values of its first
    ``lengths[b]`` tokens (``dim`` = 1, the token axis, as RDE calls it). As RDE, ``k`` shrinks for good once a
    shorter row was seen (``k = min(k, length)`` carries over to the next rows)."""
    lengths = [int(v) for v in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    results = []
    for idx, length in enumerate(lengths):
        k = min(k, length)
        results.append(maxk(x[idx, :length, :], dim - 1, k).mean(dim - 1))  # [length, D] -> [D]
    return torch.stack(results, dim=0)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose batch statistics, under torch.distributed with more than one process, are those of the
    global batch (every rank's rows); same state-dict keys (weight, bias, running_mean, running_var,
    num_batches_tracked), so checkpoints of nn.BatchNorm1d load.

    Where the batch statistics are not used (eval mode with running statistics) or there is one process,
    ``forward`` is nn.BatchNorm1d's, unchanged. Otherwise it does what torch's SyncBatchNorm does (which does not run
    on the CPU) with differentiable all-reduces (:func:`differentiable_all_reduce`, which also run on gloo): the mean
    and the biased variance over all ranks' rows (two passes: sum and count, then the sum of squared deviations), the
    gradient flowing back to every rank's rows through them; the running statistics are updated as nn.BatchNorm1d's
    on the whole batch (unbiased variance with the global count; momentum, or the cumulative average when momentum
    is None). Ranks may hold different numbers of rows (none at all, even), and must all call it (a collective).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or get_world_size() == 1:
            return super().forward(x)
        return self._global_forward(x)

    def _global_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, C] or [n, C, L] (this rank's rows) -> normalised over the global batch, same shape and dtype."""
        self._check_input_dim(x)
        C = x.shape[1]
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 at least
        flat = x.transpose(0, 1).reshape(C, -1).to(dtype)  # [n, C(, L)] -> [C, n(*L)]: a channel's values in a row
        count = flat.new_tensor([flat.shape[1]])  # [1]
        totals = differentiable_all_reduce(torch.cat([flat.sum(1), count]))  # [C + 1]: global sums, global count
        n = float(totals[-1].detach())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)} "
                             f"(global count {n:g})")
        mean = totals[:C] / n  # [C]
        centred = flat - mean[:, None]  # [C, n(*L)]
        var = differentiable_all_reduce((centred * centred).sum(1)) / n  # [C] biased variance over the global batch
        y = centred * torch.rsqrt(var + self.eps)[:, None]
        if self.weight is not None:
            y = y * self.weight.to(dtype)[:, None] + self.bias.to(dtype)[:, None]
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n)
        shape = (C, x.shape[0]) + tuple(x.shape[2:])
        return y.reshape(shape).transpose(0, 1).to(x.dtype)  # [C, n(*L)] -> [n, C(, L)]

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """nn.BatchNorm1d's update with the global batch's mean [C], biased variance [C] and row count ``n``."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / (n - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


class MLP(nn.Module):
    """``num_layers`` linear layers, BatchNorm + ReLU after each but the last (VSE-infinity's MLP, as RDE).

    Keys: ``layers.{i}`` (Linear), ``bns.{i}`` (:class:`GlobalBatchNorm1d`, BatchNorm1d's keys; the last one is built
    but unused, as RDE, and frozen).
    forward: [B, N, input_dim] -> [B, N, output_dim] (BatchNorm over the B*N tokens; of all ranks under DDP in train
    mode).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.bns = nn.ModuleList(GlobalBatchNorm1d(k) for k in h + [output_dim])
        self.bns[-1].requires_grad_(False)  # never used (kept for the keys): no gradient, so DDP does not wait for it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.size()
        x = x.reshape(B * N, D)  # [B, N, D] -> [B*N, D]
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers)):
            x = layer(x.to(layer.weight.dtype))
            if i < self.num_layers - 1:
                x = F.relu(bn(x.to(bn.weight.dtype)))
        x = x.view(B, N, self.output_dim)  # [B*N, output_dim] -> [B, N, output_dim]
        return x


class TexualEmbeddingLayer(nn.Module):
    """Text TSE layer (RDE's name, typo included). Keys: ``linear.*``, ``mlp.*``.

    forward(features [B, L, input_dim], text [B, L] ids (SOT first, EOT = the row's largest id, 0 = padding),
    atten [B, L, L] head-averaged attention of the text transformer's last block) -> [B, embed_dim] float.
    k = int((L - 2) * ratio) tokens are taken from the EOT row (SOT and EOT excluded, padding scored 0); each row pools
    over its first min(k, tokens - 2) of them.
    """

    def __init__(self, input_dim: int = 512, embed_dim: int = 1024, ratio: float = 0.3) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.linear = nn.Linear(input_dim, embed_dim)
        self.mlp = MLP(input_dim, embed_dim // 2, embed_dim, 2)
        self.ratio = ratio

    def forward(self, features: torch.Tensor, text: torch.Tensor, atten: torch.Tensor) -> torch.Tensor:
        bs, L = text.shape
        mask = (text != 0).to(atten.dtype)  # [B, L]
        lengths = mask.sum(1).view(-1) - 2  # tokens minus SOT and EOT
        k = int((atten.size(1) - 2) * self.ratio)
        eot = text.argmax(dim=-1)  # [B]
        rows = torch.arange(bs, device=text.device)
        score = atten[rows, eot, :].clone()  # the EOT row [B, L] (a copy: the given tensor is left as it is)
        score[rows, eot] = -1  # the EOT token itself
        score[:, 0] = -1  # the SOT token
        score = score * mask  # padding -> 0
        top = score.topk(dim=-1, k=k)[1]  # [B, k]
        features = torch.gather(features, 1, top.unsqueeze(-1).expand(bs, k, features.size(2)))  # [B, k, D]
        features = l2norm(features, dim=-1)
        lengths = torch.clamp(lengths, max=k)  # at most k tokens pooled
        cap_emb = self.linear(features.to(self.linear.weight.dtype))  # [B, k, embed_dim]
        features = self.mlp(features) + cap_emb
        features = maxk_pool1d_var(features, 1, 1, lengths)  # [B, k, embed_dim] -> [B, embed_dim]
        return features.float()


class VisualEmbeddingLayer(nn.Module):
    """Image TSE layer (RDE's name). Keys: ``linear.*`` (built but unused, as RDE, so its checkpoints load; frozen),
    ``fc.*``, ``mlp.*``.

    forward(base_features [B, 1+P, input_dim] (token 0 = CLS), atten [B, 1+P, 1+P] head-averaged attention of the
    image transformer's last block) -> [B, embed_dim] float: the k = int(P * ratio) patches the CLS row attends to
    most, embedded and max-pooled.
    """

    def __init__(self, input_dim: int = 512, embed_dim: int = 1024, ratio: float = 0.3) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.linear = nn.Linear(input_dim, embed_dim)
        self.linear.requires_grad_(False)  # never used (kept for the keys): no gradient, so DDP does not wait for it
        self.ratio = ratio
        self.fc = nn.Linear(input_dim, embed_dim)
        self.mlp = MLP(input_dim, embed_dim // 2, embed_dim, 2)

    def forward(self, base_features: torch.Tensor, atten: torch.Tensor) -> torch.Tensor:
        k = int((atten.size(1) - 1) * self.ratio)
        bs = base_features.size(0)
        score = atten[:, 0].clone()  # the CLS row [B, 1+P] (a copy: the given tensor is left as it is)
        score[:, 0] = -1  # the CLS token itself
        top = score.topk(dim=-1, k=k)[1]  # [B, k]
        top = top.unsqueeze(-1).expand(bs, k, base_features.size(2))  # [B, k] -> [B, k, D]
        base_features = l2norm(torch.gather(base_features, 1, top), dim=-1)  # [B, k, D]
        features = self.fc(base_features.to(self.fc.weight.dtype))
        features = self.mlp(base_features) + features
        features = maxk_pool1d_var(features, 1, 1, [k] * bs)  # [B, k, embed_dim] -> [B, embed_dim]
        return features.float()


__all__ = ["differentiable_all_reduce", "l2norm", "maxk", "maxk_pool1d", "maxk_pool1d_var", "GlobalBatchNorm1d", "MLP",
           "TexualEmbeddingLayer", "VisualEmbeddingLayer"]

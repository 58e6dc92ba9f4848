"""Reference implementations that tests and benchmarks compare the production code against (not used by it)."""
import torch


def rank_naive(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
               get_mAP: bool = True):
    """The original IRRA ``rank`` (its utils/metrics.py; O(nq * ng) memory, full sort): the reference for
    ``utils.metrics.rank``.

    Returns ``(all_cmc, mAP, mINP, indices)`` or ``(all_cmc, indices)``; ``indices`` is the full argsort [nq, ng].
    """
    if get_mAP:
        indices = torch.argsort(similarity, dim=1, descending=True)
    else:
        # acclerate sort with topk
        _, indices = torch.topk(similarity, k=max_rank, dim=1, largest=True, sorted=True)  # q * topk
    pred_labels = g_pids[indices.cpu()]  # q * k
    matches = pred_labels.eq(q_pids.view(-1, 1))  # q * k

    all_cmc = matches[:, :max_rank].cumsum(1)  # cumulative sum
    all_cmc[all_cmc > 1] = 1
    all_cmc = all_cmc.float().mean(0) * 100
    if not get_mAP:
        return all_cmc, indices

    num_rel = matches.sum(1)  # q
    tmp_cmc = matches.cumsum(1)  # q * k

    inp = [tmp_cmc[i][match_row.nonzero()[-1]] / (match_row.nonzero()[-1] + 1.0) for i, match_row in enumerate(matches)]
    mINP = torch.cat(inp).mean() * 100

    tmp_cmc = [tmp_cmc[:, i] / (i + 1.0) for i in range(tmp_cmc.shape[1])]
    tmp_cmc = torch.stack(tmp_cmc, 1) * matches
    AP = tmp_cmc.sum(1) / num_rel  # q
    mAP = AP.mean() * 100
    return all_cmc, mAP, mINP, indices


def msd_rank_naive(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
                   rank_order: bool = False):
    """UFineBench's ``mSD_rank`` (``mSD_Calculator.py``: full argsort, [nq, ng] temporaries) written out step by step:
    the reference for ``utils.metrics.mSD_rank``. Returns ``(cmc, mSD, mAP)`` in percent.

    ``rank_order=False``: as published (a rank-order mask times storage-order similarities, storage-order cumulative
    sums). ``rank_order=True``: every term in rank order (s gathered by the ranking, the mask = matches)."""
    s = similarity.double() / 2 + 0.5  # [nq, ng] in [0, 1]
    indices = torch.argsort(s, dim=1, descending=True)  # [nq, ng]
    matches = g_pids[indices].eq(q_pids.view(-1, 1))  # [nq, ng] rank order
    cmc = matches[:, :max_rank].cumsum(1).clamp(max=1).double().mean(0) * 100
    if rank_order:
        s = s.gather(1, indices)  # [nq, ng] rank order
    mask = matches.double()  # the published (indices + 1) * matches >= 1 is matches
    num_rel = matches.sum(1).double()  # [nq]
    pos_sum = (s * mask).sum(1)
    neg_avg = (s.sum(1) - pos_sum) / (s.shape[1] - num_rel)
    pn = 1 - torch.exp(-(pos_sum / num_rel) / neg_avg)  # [nq]
    sd_cmc = torch.cumsum(s * mask, 1) / torch.cumsum(s, 1) * mask  # [nq, ng]
    msd = ((sd_cmc.sum(1) / num_rel) * pn).mean() * 100
    ranks = torch.arange(1, s.shape[1] + 1, dtype=torch.float64)
    ap = (matches.cumsum(1).double() / ranks * mask).sum(1) / num_rel
    return cmc.float(), msd.float(), (ap.mean() * 100).float()

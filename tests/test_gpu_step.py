"""The training step made for accelerators (issue 17), proved on the CPU: fused attention (bitwise the numbers of
nn.MultiheadAttention's forward here), no device-to-host copy in the step (counted), and length buckets that leave
the losses bitwise the same."""
import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from model.build import build_model
from model.lengths import (caption_cut, host_lengths, masked_first, mlm_lengths, mlm_token_bucket,
                           round_up)
from model.clip_model import ResidualAttentionBlock, fused_multihead_attention
from processor.processor import prepare_batch, train_step
from solver import build_optimizer
from utils.options import get_args

from tests.conftest import make_batch as _make_batch
from test_grad_checkpointing import LOSS_KEYS
from test_grad_checkpointing import train_step as forward_backward


def make_batch(**kw):
    """Captions of different lengths, 1-2 masked words each at different positions."""
    return _make_batch(varied=True, **kw)

NUM_CLASSES = 4


def tiny_args(*extra: str):
    """A 128-wide IRRA (2 heads per attention block), fp32 on the CPU."""
    return get_args(["--pretrain_choice", "scratch:ViT-Tiny", "--img_size", "64", "32", "--loss_names", "sdm+mlm+id",
                     "--cmt_depth", "2", "--precision", "fp32", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_args(), NUM_CLASSES)


# ------------------------------------------------------------------------------------------------------------------
# fused attention
# ------------------------------------------------------------------------------------------------------------------
def test_fused_attention_is_the_default_and_keeps_the_state_dict(model):
    assert tiny_args().fused_attention and not tiny_args("--no-fused_attention").fused_attention
    blocks = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
    assert len(blocks) == 2 + 2 + 2 and all(b.fused for b in blocks) and model.fused_attention
    unfused = build_model(tiny_args("--no-fused_attention"), NUM_CLASSES)
    assert not any(b.fused for b in unfused.modules() if isinstance(b, ResidualAttentionBlock))
    # the same modules, so the same state dict: checkpoints of either load into the other
    assert {k: v.shape for k, v in unfused.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert "cross_attn.in_proj_weight" in model.state_dict()


@pytest.mark.parametrize("case", ["self", "self_causal", "self_prefix", "kv_same", "all_different", "batch_first",
                                  "masked_prefix"])
def test_fused_multihead_attention_equals_nn_multihead_attention(case):
    torch.manual_seed(0)
    dim, heads, length, batch = 32, 4, 9, 3
    attn = nn.MultiheadAttention(dim, heads, batch_first=case == "batch_first")
    nn.init.normal_(attn.in_proj_bias)
    nn.init.normal_(attn.out_proj.bias)
    x, y, z = (torch.randn(length, batch, dim) for _ in range(3))
    causal = torch.full((length, length), float("-inf")).triu_(1)
    mask, is_causal = None, False
    q, k, v = x, x, x
    if case == "self_causal":
        mask, is_causal = causal, True
    elif case == "self_prefix":
        q = x[:4]
    elif case == "masked_prefix":
        q, mask = x[:4], causal[:4]
    elif case == "kv_same":
        q, k, v = y, x, x
    elif case == "all_different":
        q, k, v = x, y, z
    elif case == "batch_first":
        q, k, v = y.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1)
        k = v
    want = attn(q, k, v, need_weights=False, attn_mask=mask)[0]
    got = fused_multihead_attention(attn, q, k, v, attn_mask=None if is_causal else mask, is_causal=is_causal)
    assert got.shape == want.shape
    assert torch.equal(got, want)  # bitwise on the CPU: the same projections and attention kernel


def test_block_need_weights_gives_the_unfused_weights():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, attn_mask=torch.full((12, 12), float("-inf")).triu_(1))
    assert block.causal and block.fused
    x = torch.randn(7, 2, 32)
    out, weights = block.attention(x, need_weights=True)
    assert weights.shape == (2, 7, 7)  # averaged over heads
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7))
    assert torch.count_nonzero(weights.triu(1)) == 0  # causal
    torch.testing.assert_close(out, block.attention(x), rtol=1e-5, atol=1e-6)  # the unfused math: float rounding
    _, prefix_weights = block.attention(x, query_len=3, need_weights=True)
    torch.testing.assert_close(prefix_weights, weights[:, :3], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fast", [True, False])
def test_fused_and_unfused_training_step_bitwise_equal(model, fast):
    """Losses and every gradient of the whole model (image, text, cross-modal blocks, cross_attn)."""
    batch = make_batch()
    unfused = copy.deepcopy(model)
    unfused.set_fused_attention(False)
    model.fast = unfused.fast = fast
    try:
        loss_f, grad_f, _ = forward_backward(model, batch)
        loss_u, grad_u, _ = forward_backward(unfused, batch)
    finally:
        model.fast = True
    for k in LOSS_KEYS:
        assert torch.equal(loss_f[k], loss_u[k]), k
    assert grad_f.keys() == grad_u.keys()
    for n in grad_f:
        assert torch.equal(grad_f[n], grad_u[n]), n


# ------------------------------------------------------------------------------------------------------------------
# length buckets
# ------------------------------------------------------------------------------------------------------------------
def test_bucket_sizes():
    assert [round_up(n, 8) for n in (1, 8, 9, 77)] == [8, 8, 16, 80]
    assert [mlm_token_bucket(n) for n in (0, 1, 8, 9, 32, 33, 41, 64, 65, 100, 129, 200)] == \
        [8, 8, 8, 16, 32, 40, 48, 64, 80, 112, 160, 224]
    assert all(mlm_token_bucket(n, 1) == n for n in range(300))
    for n in range(33, 5000):  # at most 25 % padding above 32, and few sizes
        assert n <= mlm_token_bucket(n) <= 1.25 * n
    assert len({mlm_token_bucket(n) for n in range(1, 5000)}) <= 45
    caps = torch.tensor([[49406, 5, 49407, 0, 0, 0, 0, 0, 0, 0, 0],
                         [49406, 5, 6, 7, 8, 9, 49407, 0, 0, 0, 0]])
    assert caption_cut(caps) == 7 and caption_cut(caps, 4) == 8 and caption_cut(caps, 6) == 11  # at most L
    labels = torch.zeros(2, 11, dtype=torch.long)
    assert mlm_lengths(labels) == {"mlm_query_len": 1, "mlm_tokens": 0}
    labels[0, 2], labels[1, 4], labels[1, 5] = 3, 4, 5
    assert mlm_lengths(labels) == {"mlm_query_len": 6, "mlm_tokens": 3}
    assert mlm_lengths(labels, 4) == {"mlm_query_len": 8, "mlm_tokens": 4}
    assert mlm_lengths(labels, 8) == {"mlm_query_len": 8, "mlm_tokens": 8}
    assert mlm_lengths(labels, 16) == {"mlm_query_len": 11, "mlm_tokens": 16}  # at most L
    assert mlm_lengths(labels[:1, :3], 16) == {"mlm_query_len": 3, "mlm_tokens": 3}  # at most B * query length


def test_masked_first_is_the_boolean_index():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (5, 13), generator=g) * torch.randint(1, 9, (5, 13), generator=g)
    flat = labels.reshape(-1)
    n = int((flat != 0).sum())
    idx = masked_first(labels, n + 7)
    assert torch.equal(idx[:n], torch.nonzero(flat).reshape(-1))  # the masked positions, in row-major order
    assert (flat[idx[n:]] == 0).all() and len(set(idx.tolist())) == n + 7  # padding: distinct unmasked positions


def test_length_bucket_leaves_the_losses_equal(model):
    """The cut is exact in exact arithmetic (causal attention, EOT pooling; the MLM head's padding has label 0), but
    not bitwise in floats: the text transformer's matmuls and attention reduce over another number of (zero-weight)
    positions, so a loss can move by an ulp (3e-7 relative seen here with captions cut at 15 vs 16 tokens), and the
    LayerNorm weight gradients, which sum over the rows, by float rounding. Hence --length_bucket is off by default."""
    for bs in (3, 4):
        batch = make_batch(bs=bs)  # bs 3: 6 masked tokens, padded to 8
        exact, bucketed = host_lengths(batch), host_lengths(batch, 8)
        assert bucketed["caption_cut"] % 8 == 0 and bucketed["mlm_query_len"] % 8 == 0
        assert bucketed["caption_cut"] > exact["caption_cut"] and bucketed["mlm_query_len"] >= exact["mlm_query_len"]
        assert bucketed["mlm_tokens"] >= exact["mlm_tokens"] == int((batch["mlm_labels"] != 0).sum())
        loss_e, grad_e, _ = forward_backward(model, {**batch, **exact})
        loss_b, grad_b, _ = forward_backward(model, {**batch, **bucketed})
        for k in LOSS_KEYS:
            torch.testing.assert_close(loss_b[k], loss_e[k], rtol=1e-6, atol=0, msg=k)
        for n in grad_e:
            torch.testing.assert_close(grad_b[n], grad_e[n], rtol=1e-4, atol=1e-5 * float(grad_e[n].abs().max()),
                                       msg=n)
        padded = bucketed["mlm_tokens"] > exact["mlm_tokens"], bucketed["mlm_query_len"] > exact["mlm_query_len"]
        assert padded == ((True, False) if bs == 3 else (False, True))  # both kinds of padding are tried
    # the option: the model's own lengths when the batch carries none
    bucket_model = copy.deepcopy(model)
    bucket_model.length_bucket = 8
    assert bucket_model.host_lengths(batch) == bucketed
    loss_m, _, _ = forward_backward(bucket_model, batch)
    assert all(torch.equal(loss_m[k], loss_b[k]) for k in LOSS_KEYS)
    with pytest.raises(ValueError, match="--length_bucket 0"):
        build_model(tiny_args("--length_bucket", "0"), NUM_CLASSES)


# ------------------------------------------------------------------------------------------------------------------
# host syncs
# ------------------------------------------------------------------------------------------------------------------
class SyncCounter:
    """Counts what would copy from an accelerator to the host (a sync): reading a tensor's value in Python (item,
    tolist, bool/int/float, .cpu(), .numpy()) and the operators whose output shape depends on the data (nonzero,
    masked_select, boolean indexing, unique, ...). On the CPU nothing syncs, but the same calls would on a GPU."""

    PY_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
                  torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
    ATEN = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_dim", "_unique2",
            "unique_consecutive", "repeat_interleave"}

    def __init__(self):
        counter = self
        self.calls = []

        class _Py(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in SyncCounter.PY_METHODS:
                    counter.calls.append(getattr(func, "__name__", str(func)))
                return func(*args, **(kwargs or {}))

        class _Aten(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name.split("::")[-1]
                bool_index = name == "index" and any(
                    isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
                if name in SyncCounter.ATEN or bool_index:
                    counter.calls.append(str(func))
                return func(*args, **(kwargs or {}))

        self._modes = (_Py(), _Aten())

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def test_sync_counter_sees_syncs():
    x = torch.randn(6)
    with SyncCounter() as c:
        x[x > 0]
        float(x.sum())
        x.tolist()
        torch.nonzero(x)
    assert len(c.calls) >= 4, c.calls


def test_forward_backward_without_host_lengths_syncs(model):
    """Without the host lengths the fast path reads them from the tensors: the counter sees it."""
    batch = make_batch()
    with SyncCounter() as c:
        forward_backward(model, batch)
    assert c.calls


@pytest.mark.parametrize("bucket", [1, 8])
def test_training_step_has_no_host_sync(bucket):
    """The trainer's step (processor.train_step: forward, losses, backward, fused AdamW step) on a batch from
    prepare_batch, which computes the lengths on the host: not one device-to-host copy."""
    torch.manual_seed(0)
    args = tiny_args("--length_bucket", str(bucket), "--optimizer", "AdamW", "--fused_optimizer")
    m = build_model(args, NUM_CLASSES).train()
    optimizer = build_optimizer(args, m)
    batch = prepare_batch(m, make_batch(), torch.device("cpu"))
    assert {"caption_cut", "mlm_query_len", "mlm_tokens"} <= set(batch)
    for _ in range(2):  # the second step includes the optimizer's state
        with SyncCounter() as c:
            ret, loss = train_step(m, batch, optimizer, precision=args.precision)
        assert c.calls == [], c.calls
    assert torch.isfinite(loss) and set(LOSS_KEYS) <= set(ret)


def test_train_step_orders_give_the_same_update():
    """free_grads_first=False (the original's order) and True (the trainer's) make the same step."""
    args = tiny_args("--optimizer", "AdamW")
    results = []
    for first in (True, False):
        torch.manual_seed(0)
        m = build_model(args, NUM_CLASSES).train()
        optimizer = build_optimizer(args, m)
        batch = prepare_batch(m, make_batch(), torch.device("cpu"))
        for _ in range(2):
            train_step(m, batch, optimizer, free_grads_first=first)
        results.append(m.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k

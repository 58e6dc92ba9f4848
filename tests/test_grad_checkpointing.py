"""--grad_checkpointing: the transformer blocks are recomputed in backward, and losses / gradients stay those of the
plain run (tiny IRRA, fp32, same weights, same batch)."""
import copy
from collections import Counter

import pytest
import torch

from model.build import build_model
from model.clip_model import ResidualAttentionBlock, Transformer
from utils.options import get_args
from tests.conftest import make_batch

NUM_CLASSES = 4
LOSS_KEYS = ("sdm_loss", "id_loss", "mlm_loss")


def tiny_args(*extra: str):
    return get_args(["--pretrain_choice", "scratch:ViT-Micro", "--img_size", "64", "32", "--loss_names", "sdm+mlm+id",
                     "--cmt_depth", "2", "--precision", "fp32", "--device", "cpu", *extra])


def block_names(model):
    return {m: n for n, m in model.named_modules() if isinstance(m, ResidualAttentionBlock)}


def train_step(model, batch):
    """One forward + backward; returns (losses, grads by name, forward calls per block name)."""
    names = block_names(model)
    calls = Counter()
    hooks = [b.register_forward_pre_hook(lambda m, i: calls.update([names[m]])) for b in names]
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        ret = model(batch)
        sum(v for k, v in ret.items() if "loss" in k).backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: ret[k].detach() for k in LOSS_KEYS}, grads, calls


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    plain = build_model(tiny_args(), NUM_CLASSES)
    torch.manual_seed(1)  # different random init: the weights below must come from `plain`
    ckpt = build_model(tiny_args("--grad_checkpointing"), NUM_CLASSES)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def test_option_and_flags():
    assert tiny_args().grad_checkpointing is False
    assert tiny_args("--grad_checkpointing").grad_checkpointing is True
    plain = build_model(tiny_args(), NUM_CLASSES)
    ckpt = build_model(tiny_args("--grad_checkpointing"), NUM_CLASSES)
    for m, want in ((plain, False), (ckpt, True)):
        flags = {n: t.grad_checkpointing for n, t in m.named_modules() if isinstance(t, Transformer)}
        assert flags == {"base_model.visual.transformer": want, "base_model.transformer": want,
                         "cross_modal_transformer": want}
    ckpt.set_grad_checkpointing(False)
    assert not any(t.grad_checkpointing for t in ckpt.modules() if isinstance(t, Transformer))


@pytest.mark.parametrize("fast", [True, False])
def test_same_losses_and_grads(models, fast):
    plain, ckpt = models
    batch = make_batch(varied=True)
    plain.fast = ckpt.fast = fast
    loss_p, grad_p, calls_p = train_step(plain, batch)
    loss_c, grad_c, calls_c = train_step(ckpt, batch)

    # plain: every block runs once per use (the text blocks twice: captions and MLM ids); checkpointed: each use is
    # recomputed once more in backward -- in the image, text and cross-modal transformers alike
    assert set(calls_p) == set(block_names(plain).values()) and len(calls_p) == 1 + 1 + 2
    for name, n in calls_p.items():
        assert n == (2 if name.startswith("base_model.transformer.") else 1), name
        assert calls_c[name] == 2 * n, name
    # the fast path's special last cross-modal block is recomputed as well
    assert calls_c["cross_modal_transformer.resblocks.1"] == 2

    for k in LOSS_KEYS:
        torch.testing.assert_close(loss_c[k], loss_p[k], rtol=1e-6, atol=1e-7, msg=k)
    assert grad_c.keys() == grad_p.keys() == {n for n, p in plain.named_parameters() if p.requires_grad}
    for n in grad_p:
        assert grad_p[n].abs().sum() > 0, n  # a parameter the losses reach
        torch.testing.assert_close(grad_c[n], grad_p[n], rtol=1e-6, atol=1e-9, msg=n)  # bitwise equal when written


def test_checkpointing_keeps_fewer_activations():
    """The point of it: the forward pass keeps far fewer activations for backward (bytes of the distinct storages
    saved by autograd, the weights not counted)."""
    # 33 image tokens: the ViT blocks' activations dominate, as at full size
    plain = build_model(tiny_args("--img_size", "128", "64"), NUM_CLASSES)
    ckpt = build_model(tiny_args("--img_size", "128", "64", "--grad_checkpointing"), NUM_CLASSES)
    batch = make_batch(varied=True, img=(128, 64))

    def saved_activation_bytes(model):
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in weights:
                storages[st.data_ptr()] = st.nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch)
        return sum(storages.values())

    assert saved_activation_bytes(ckpt) < 0.6 * saved_activation_bytes(plain)  # 0.41 when written


def test_no_recompute_in_eval_or_no_grad(models):
    _, ckpt = models
    batch = make_batch(varied=True)
    names = block_names(ckpt)
    calls = Counter()
    hooks = [b.register_forward_pre_hook(lambda m, i: calls.update([names[m]])) for b in names]
    try:
        ckpt.train()
        with torch.no_grad():
            ckpt(batch)
        ckpt.eval()
        ret = ckpt(batch)
        sum(v for k, v in ret.items() if "loss" in k).backward()  # eval mode with autograd: plain backward
    finally:
        for h in hooks:
            h.remove()
        ckpt.train()
    assert calls["base_model.visual.transformer.resblocks.0"] == 2  # one forward each, no recomputation
    assert calls["cross_modal_transformer.resblocks.1"] == 2


def test_resnet_backbone_not_checkpointed():
    """ModifiedResNet: recomputing BatchNorm in training would update its running stats twice, so the image encoder
    is left as it is; the text and cross-modal blocks are checkpointed, and everything matches the plain run."""
    torch.manual_seed(0)
    plain = build_model(tiny_args("--pretrain_choice", "scratch:RN-Tiny"), NUM_CLASSES)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.base_model.transformer.grad_checkpointing and ckpt.cross_modal_transformer.grad_checkpointing
    batch = make_batch(varied=True)
    loss_p, grad_p, calls_p = train_step(plain, batch)
    loss_c, grad_c, calls_c = train_step(ckpt, batch)
    assert calls_c["base_model.transformer.resblocks.0"] == 2 * calls_p["base_model.transformer.resblocks.0"]
    for k in LOSS_KEYS:
        torch.testing.assert_close(loss_c[k], loss_p[k], rtol=1e-6, atol=1e-7, msg=k)
    for n in grad_p:
        torch.testing.assert_close(grad_c[n], grad_p[n], rtol=1e-6, atol=1e-9, msg=n)  # bitwise equal when written
    bn = dict(plain.named_buffers())
    for n, b in ckpt.named_buffers():
        if "running" in n or "num_batches" in n:
            torch.testing.assert_close(b, bn[n], rtol=0, atol=0, msg=n)


def test_transformer_query_len_is_a_prefix_of_the_full_output():
    """Transformer(x, query_len) == Transformer(x)[:query_len], with and without a causal mask, checkpointed too."""
    torch.manual_seed(0)
    mask = torch.full((12, 12), float("-inf")).triu_(1)
    x = torch.randn(10, 3, 64)  # LND
    for attn_mask in (None, mask):
        t = Transformer(64, 2, 1, attn_mask=attn_mask)
        full = t(x)
        for ckpt in (False, True):
            t.grad_checkpointing = ckpt
            torch.testing.assert_close(t(x, query_len=4), full[:4], rtol=1e-6, atol=1e-6)

"""The encoder's attention: the relative-position bias written by one GEMM equals SAM's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpsam_toolkit.network.encoder import Attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sam_attention(att: Attention, x: torch.Tensor) -> torch.Tensor:
    """``segment_anything``'s formula: softmax(q k^T / sqrt(d) + rel_h[..., None] + rel_w) v."""
    b, h, w, c = x.shape
    qkv = att.qkv(x).reshape(b, h * w, 3, att.heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    rh, rw = att._lookups(q.dtype)
    r_q = q.reshape(b, att.heads, h, w, -1)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, att.heads, h * w, h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return att.proj(out.transpose(1, 2).reshape(b, h, w, c)), bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_bias_equals_the_broadcast_sum(dtype):
    torch.manual_seed(0)
    att = Attention(64, 4, 8, 15).eval()
    with torch.no_grad():
        att.rel_pos_h.normal_(0, 0.5)
        att.rel_pos_w.normal_(0, 0.5)
    att = att.to(dtype)
    x = torch.randn(3, 8, 8, 64).to(dtype)
    with torch.inference_mode():
        ref, bias = sam_attention(att, x)
        q = att.qkv(x).reshape(3, 64, 3, 4, 16).permute(2, 0, 3, 1, 4)[0]
        rh, rw = att._lookups(dtype)
        r_q = q.reshape(3, 4, 8, 8, 16)
        rel = torch.cat([torch.einsum("bnhwc,hkc->bnhwk", r_q, rh),
                         torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)], -1).reshape(3, 4, 64, 16)
        assert torch.equal(rel @ att._spread(8, 8, rel), bias)  # the same bits
        torch.testing.assert_close(att(x), ref, rtol=0, atol=0)


def test_gemm_bias_trains_the_tables():
    torch.manual_seed(1)
    att = Attention(32, 2, 4, 7).train()
    x = torch.randn(2, 4, 4, 32)
    att(x).square().sum().backward()
    assert att.rel_pos_h.grad is not None and att.rel_pos_h.grad.abs().sum() > 0
    assert att.rel_pos_w.grad is not None and att.rel_pos_w.grad.abs().sum() > 0

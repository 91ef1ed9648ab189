"""The absorbed decoding step with every product written as a multiply and a sum, for torch.compile to fuse.

In the compiled fixed-shape step (static_decode) each small matmul is a cuBLAS call of its own, ~11 a decoder
layer: at batch 4 the count of kernels, not the ~30 MB a step reads, sets the time. Written as elementwise
products reduced over their last axis, the same math is what Inductor fuses: each projection with the layer
norm or softmax beside it becomes one generated kernel. The sums run in another order than cuBLAS's (float32
either way); StaticDecoder(how="fused") compiles this step and captures it in a CUDA graph as "compiled" does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mnist_grid.tokens import FINISH, PAD


def _layer_norm(x, norm):
    w, b, eps = norm
    return F.layer_norm(x, w.shape, w, b, eps)


def _linear(x, w, b=None):
    """x [..., K] @ w [N, K]^T as a product and a sum over the contiguous K."""
    y = (x.unsqueeze(-2) * w).sum(-1)
    return y if b is None else y + b


def output_major(layer) -> tuple:
    """The absorbed projections of one static_decode._Layer, [out, in] as _linear reads them (copies, per run)."""
    return tuple(w.t().contiguous() for w in (layer.self_q, layer.self_o, layer.cross_q, layer.cross_o))


def step(dec) -> None:
    """One position of StaticDecoder `dec`, as its _step: reads tokens[:, p], writes cache row p, tokens[:, p + 1]."""
    b, h, r, pe = dec.batch, dec.heads, dec.kv_rank, dec.rope_dim
    at = dec._pos.view(1)
    cos, sin = dec._cos.index_select(0, at), dec._sin.index_select(0, at)

    def rotate(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    embed, final_norm, head_w, head_b = dec._top
    x = F.embedding(dec._tokens.index_select(1, at), embed).view(b, -1)  # [B, d]
    for s in dec._layers:
        norm1, q_a_norm, kv_a_norm, norm2, norm3, fc1_w, fc1_b, fc2_w, fc2_b = s.params
        self_q, self_o, cross_q, cross_o = s.output_major
        # Self-attention, absorbed; the cache's last column is 0 for written rows, -inf for the others.
        q_a, c, k_pe = _linear(_layer_norm(x, norm1), s.w_a).split([dec.q_rank, r, pe], dim=-1)
        kv = torch.cat([_layer_norm(c, kv_a_norm), rotate(k_pe), dec._written.view(b, 1)], dim=-1)
        s.kv.index_copy_(1, at, kv.view(b, 1, -1))
        q = _linear(_layer_norm(q_a, q_a_norm), self_q, dec._q_bias).view(b, h, -1)
        q = torch.cat([q[..., :r], rotate(q[..., r : r + pe]), q[..., r + pe :]], dim=-1)
        scores = (q.unsqueeze(2) * s.kv.unsqueeze(1)).sum(-1)  # [B, H, L]
        out = (scores.softmax(-1).unsqueeze(-1) * s.kv[:, None, :, :r]).sum(2)  # [B, H, r]
        x = x + _linear(out.reshape(b, -1), self_o)
        # Cross-attention over the latent memory.
        q = _linear(_layer_norm(x, norm2), cross_q).view(b, h, -1)
        scores = (q.unsqueeze(2) * s.memory.unsqueeze(1)).sum(-1)
        out = (scores.softmax(-1).unsqueeze(-1) * s.memory.unsqueeze(1)).sum(2)
        x = x + _linear(out.reshape(b, -1), cross_o)
        x = x + _linear(F.gelu(_linear(_layer_norm(x, norm3), fc1_w, fc1_b)), fc2_w, fc2_b)
    if final_norm is not None:
        x = _layer_norm(x, final_norm)
    nxt = _linear(x, head_w, head_b).argmax(-1).masked_fill(dec._finished, PAD)  # [B]
    dec._tokens.index_copy_(1, at + 1, nxt[:, None])
    dec._finished |= nxt == FINISH
    dec._pos += 1

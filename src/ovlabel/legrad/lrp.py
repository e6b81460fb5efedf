"""Chefer, Gur, Wolf (CVPR 2021): LRP relevance propagation + gradients, for open_clip ViT towers.

Relevance starts as 1 at the target image–text score ``s_k = exp(logit_scale)·t_k·e`` and is propagated
down to every block's attention probabilities with these rules (the ones of the authors' ViT code):

* **Linear layers** (score, projection, qkv, out-proj, fc1, fc2, mean pooling): LRP-αβ with α=1, β=0
  (the z⁺ rule) — only positive contributions ``w⁺x⁺ + w⁻x⁻`` carry relevance; biases take none.
  Computed as ``Z = ½(|x||W|ᵀ + xWᵀ)`` and ``R_in = ½(x ⊙ SW + |x| ⊙ S|W|)`` with ``S = R / Z``
  (algebraically identical to the four-term form, with three matmuls instead of four).
* **Residual additions** ``x0 + x1``: the z-rule ``R_i = x_i·R/Z`` per branch, then each branch is
  rescaled so that its total is its share ``|Σa| / (|Σa| + |Σb|)`` of the incoming total — relevance is
  conserved exactly. Where the stream is cloned into a branch, the two relevances add up.
* **Attention matmuls** ``A·V`` and ``Q·Kᵀ``: two-operand z-rule, each operand's share halved (each
  product counts once per operand). The relevance ``R_A`` at the attention probabilities is read here.
* **LayerNorm, activation (GELU/QuickGELU), softmax, L2 normalisation, LayerScale and the 1/√d scale**:
  identity — relevance passes unchanged. These layers rescale or reshape values monotonically
  within a token; Chefer et al. treat them as pass-through, and every alternative (e.g. the z-rule
  through LayerNorm's centering) breaks conservation or needs a reference point with no natural choice.
* **CLS pooling**: all relevance to the CLS token.

Divisions use Chefer's stabiliser ``a / (b + 1e-9)`` (0 where ``b = 0``). Then per selected block
``Ā = I + mean_h max(∇A ⊙ R_A, 0)`` (``∇A``: gradient of the same score), ``C = Π Ā`` (later blocks on
the left) and the map is ``C[CLS, P:]``.

Cost per query: one forward (shared by all queries), one backward through the shared graph per query
chunk for ``∇A``, and an LRP pass whose linear rules cost three matmuls each (≈3× a forward); relevance
for a chunk of queries is propagated together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from .base import accumulation_dtype, image_text_logits, logit_scale, query_chunks
from .baselines import patches, readout_row
from .ops import Activation, LayerNorm, Linear, MeanTokens, Op, SelectToken
from .towers import Block, Tower, merge_heads, split_heads

Tensor = torch.Tensor
Trace = Callable[[str, Tensor, Tensor], None]


def safe_divide(a: Tensor, b: Tensor) -> Tensor:
    """Chefer's stabilised division ``a / (b + 1e-9)``, 0 where ``b = 0``."""
    return torch.where(b != 0, a / (b + 1e-9), torch.zeros((), dtype=a.dtype, device=a.device))


def lrp_linear(R: Tensor, x: Tensor, W: Tensor, Wx: Tensor | None = None, W_abs: Tensor | None = None) -> Tensor:
    """α1β0 rule for ``y = x Wᵀ (+ b)``. ``R``: ``[B,K,...,out]``; ``x``: ``[B,...,in]`` (broadcast over K).
    ``Wx`` (``x Wᵀ`` without bias, ``[B,...,out]``) saves a matmul when the forward already has it."""
    W_abs = W.abs() if W_abs is None else W_abs
    x = x.unsqueeze(1)
    Wx = F.linear(x, W) if Wx is None else Wx.unsqueeze(1)
    Z = F.linear(x.abs(), W_abs).add_(Wx).mul_(0.5)
    S = safe_divide(R, Z)
    both = S @ torch.cat([W, W_abs], dim=1)  # one GEMM for S·W and S·|W|
    n = W.shape[1]
    return (x * both[..., :n]).add_(x.abs() * both[..., n:]).mul_(0.5)


def lrp_add(R: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
    """Residual ``x0 + x1`` (``[B,T,D]``, broadcast over K): z-rule, then conservation by share."""
    x0, x1 = x0.unsqueeze(1), x1.unsqueeze(1)
    S = safe_divide(R, x0 + x1)
    a, b = x0 * S, x1 * S
    dims = tuple(range(2, R.ndim))
    a_sum, b_sum, r_sum = a.sum(dims, keepdim=True), b.sum(dims, keepdim=True), R.sum(dims, keepdim=True)
    share = a_sum.abs() + b_sum.abs()
    a_fact = safe_divide(a_sum.abs(), share) * r_sum
    b_fact = safe_divide(b_sum.abs(), share) * r_sum
    return a * safe_divide(a_fact, a_sum), b * safe_divide(b_fact, b_sum)


def lrp_matmul(R: Tensor, X: Tensor, Y: Tensor, Z: Tensor) -> tuple[Tensor, Tensor]:
    """Two-operand rule for ``Z = X @ Y`` (operands broadcast over K), each share halved."""
    X, Y, Z = X.unsqueeze(1), Y.unsqueeze(1), Z.unsqueeze(1)
    S = safe_divide(R, Z).mul_(0.5)  # the halving, applied to the (smaller or equal) quotient
    return (S @ Y.transpose(-1, -2)).mul_(X), (X.transpose(-1, -2) @ S).mul_(Y)


@dataclass
class _BlockState:
    x: Tensor
    u1: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    attn_graph: Tensor  # in the autograd graph, for ∇A
    ctx: Tensor  # per head A·V, [B,H,T,d]
    ctx_merged: Tensor
    o: Tensor  # out-proj output before LayerScale
    x_mid: Tensor
    u2: Tensor
    a: Tensor  # fc1 output (pre-activation)
    h: Tensor
    m: Tensor  # fc2 output before LayerScale


def _mlp_parts(blk: Block) -> tuple[LayerNorm | None, Linear, Activation, Linear, Tensor | None]:
    m = blk.mlp
    return m.norm, m.fc1, m.act, m.fc2, m.gamma


def _block_forward(blk: Block, x: Tensor) -> tuple[Tensor, _BlockState]:
    u1 = blk.ln1.forward(x)[0]
    qkv = blk.qkv.forward(u1)[0]
    q, k, v = (split_heads(t, blk.heads) for t in qkv.chunk(3, dim=-1))
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    attn = torch.softmax(logits, dim=-1)
    ctx = attn @ v
    ctx_merged = merge_heads(ctx)
    o = blk.out.forward(ctx_merged)[0]
    x_mid = x + (o * blk.gamma1 if blk.gamma1 is not None else o)
    ln2, fc1, act, fc2, gamma2 = _mlp_parts(blk)
    u2 = ln2.forward(x_mid)[0] if ln2 is not None else x_mid
    a = fc1.forward(u2)[0]
    h = act.forward(a)[0]
    m = fc2.forward(h)[0]
    z = x_mid + (m * gamma2 if gamma2 is not None else m)
    d = lambda t: t.detach()  # noqa: E731
    return z, _BlockState(d(x), d(u1), d(q), d(k), d(v), attn, d(ctx), d(ctx_merged), d(o), d(x_mid), d(u2),
                          d(a), d(h), d(m))


def _nobias(y: Tensor, lin: Linear) -> Tensor:
    return y if lin.bias is None else y - lin.bias


def _block_relprop(blk: Block, st: _BlockState, R: Tensor, trace: Trace | None,
                   need_input: bool = True) -> tuple[Tensor | None, Tensor]:
    """Relevance at the block output ``[B,K,T,D]`` → (relevance at the block input, R_A ``[B,K,H,T,T]``).
    ``need_input=False`` stops at ``R_A`` (the lowest block of interest)."""
    _, fc1, _, fc2, gamma2 = _mlp_parts(blk)
    branch = st.m * gamma2 if gamma2 is not None else st.m
    r_res, r_mlp = lrp_add(R, st.x_mid, branch)
    if trace:
        trace("residual_mlp", R, r_res + r_mlp)
    r_h = lrp_linear(r_mlp, st.h, fc2.weight, _nobias(st.m, fc2))  # LayerScale: identity
    if trace:
        trace("fc2", r_mlp, r_h)
    r_u2 = lrp_linear(r_h, st.u2, fc1.weight, _nobias(st.a, fc1))  # activation: identity
    if trace:
        trace("fc1", r_h, r_u2)
    r_mid = r_res + r_u2  # LayerNorm identity; the stream was cloned into the branch
    attn_branch = st.o * blk.gamma1 if blk.gamma1 is not None else st.o
    r_x, r_attn = lrp_add(r_mid, st.x, attn_branch)
    if trace:
        trace("residual_attn", r_mid, r_x + r_attn)
    r_ctx = lrp_linear(r_attn, st.ctx_merged, blk.out.weight, _nobias(st.o, blk.out))
    if trace:
        trace("out_proj", r_attn, r_ctx)
    B, K, T, D = r_ctx.shape
    r_ctx = r_ctx.reshape(B, K, T, blk.heads, -1).transpose(2, 3)  # [B,K,H,T,d]
    attn = st.attn_graph.detach()
    r_a, r_v = lrp_matmul(r_ctx, attn, st.v, st.ctx)
    if trace:
        trace("attn@v", r_ctx, torch.cat([r_a.flatten(2), r_v.flatten(2)], -1))
    if not need_input:
        return None, r_a
    qk = st.q @ st.k.transpose(-1, -2)  # softmax and 1/sqrt(d): identity
    r_q, r_kt = lrp_matmul(r_a, st.q, st.k.transpose(-1, -2), qk)
    if trace:
        trace("q@k", r_a, torch.cat([r_q.flatten(2), r_kt.flatten(2)], -1))
    r_qkv = torch.cat([merge_heads_k(r_q), merge_heads_k(r_kt.transpose(-1, -2)), merge_heads_k(r_v)], dim=-1)
    qkv_out = torch.cat([merge_heads(st.q), merge_heads(st.k), merge_heads(st.v)], dim=-1)
    r_u1 = lrp_linear(r_qkv, st.u1, blk.qkv.weight, _nobias(qkv_out, blk.qkv))
    if trace:
        trace("qkv", r_qkv, r_u1)
    return r_x + r_u1, r_a  # LayerNorm identity; clone: relevances add


def merge_heads_k(x: Tensor) -> Tensor:
    """``[B,K,H,T,d]`` → ``[B,K,T,H·d]``."""
    B, K, H, T, d = x.shape
    return x.transpose(2, 3).reshape(B, K, T, H * d)


def _head_relprop(head: tuple[Op, ...], tokens: Tensor, R: Tensor, trace: Trace | None) -> Tensor:
    """Relevance at the (unnormalised) embedding ``[B,K,E]`` → at the final tokens ``[B,K,T,D]``."""
    xs = [tokens]
    for op in head:
        xs.append(op.forward(xs[-1])[0])
    for op, x, y in zip(reversed(head), reversed(xs[:-1]), reversed(xs[1:])):
        if isinstance(op, Linear):
            r_in = lrp_linear(R, x, op.weight, _nobias(y, op))
            if trace:
                trace("projection", R, r_in)
            R = r_in
        elif isinstance(op, SelectToken):
            out = R.new_zeros(*R.shape[:2], x.shape[1], R.shape[-1])
            out[:, :, op.index] = R
            R = out
        elif isinstance(op, MeanTokens):
            n = x.shape[1] - op.start
            w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
            w[op.start :] = 1.0 / n
            xt = x.transpose(1, 2)  # [B,D,T]: pooling is a linear map over tokens
            r = lrp_linear(R.unsqueeze(-1), xt, w.unsqueeze(0), None, w.unsqueeze(0))  # [B,K,D,T]
            if trace:
                trace("mean_pool", R, r)
            R = r.transpose(-1, -2)
        # LayerNorm: identity
    return R


def chefer_lrp(model, tower: Tower, images: Tensor, text: Tensor, layers: list[int],
               chunk_size: int | None, trace: Trace | None = None) -> Tensor:
    """Chefer 2021 maps ``[B,K,gh,gw]`` (see the module docstring)."""
    if tower.pool is not None or tower.head is None:
        raise UnsupportedModelError(
            "chefer_lrp propagates relevance through CLS-token open_clip VisionTransformer towers; this "
            "tower ends in an attention pooler (SigLIP/CoCa). Use legrad, chefercam, gradcam or rollout.")
    first = min(layers)
    with torch.no_grad():
        x, grid = tower.embed(images)
        for blk in tower.blocks[:first]:
            x = _block_forward(blk, x)[0]
    states: dict[int, _BlockState] = {}
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        for i in range(first, len(tower.blocks)):
            x, states[i] = _block_forward(tower.blocks[i], x)
        tokens = x
        emb = tokens
        for op in tower.head:
            emb = op.forward(emb)[0]
        scores = image_text_logits(model, emb, text)  # [B,K]
    tokens = tokens.detach()
    emb = emb.detach()
    B, K = scores.shape
    scale = logit_scale(model, emb.dtype)
    e = F.normalize(emb, dim=-1)
    T = tokens.shape[1]
    per_query = T * tokens.shape[-1] * 8 * B
    out = torch.zeros(B, K, *grid, dtype=accumulation_dtype(e.dtype), device=images.device)
    targets = [states[i].attn_graph for i in layers]
    for sl in query_chunks(K, per_query, chunk_size, images.device):
        k0, k1 = sl.start, sl.stop
        go = scores.new_zeros(k1 - k0, B, K)
        go[torch.arange(k1 - k0), :, torch.arange(k0, k1)] = 1
        grads = torch.autograd.grad(scores, targets, grad_outputs=go, is_grads_batched=True, retain_graph=k1 < K)
        grads = {i: g.detach().transpose(0, 1) for i, g in zip(layers, grads)}  # [B,k,H,T,T]
        # Score layer s_k = (scale·t_k)·e: α1β0 rule from relevance 1; L2 normalisation: identity.
        w = scale * text[k0:k1]  # [k,E]
        # R[b, q, j] = 1 where j = q: each query's relevance starts at its own score only.
        R = torch.eye(k1 - k0, dtype=e.dtype, device=e.device).expand(B, -1, -1)
        R_e = lrp_linear(R, e, w)  # [B,k,E]
        if trace:
            trace("score", R, R_e)
        R_tok = _head_relprop(tower.head, tokens, R_e, trace)
        v = readout_row(tower, B, T).unsqueeze(1).expand(B, k1 - k0, T)
        r_a = {}
        for i in range(len(tower.blocks) - 1, first - 1, -1):
            R_tok, r_a[i] = _block_relprop(tower.blocks[i], states[i], R_tok, trace, need_input=i > first)
        for i in sorted(layers, reverse=True):
            a_bar = grads[i].mul_(r_a[i]).clamp_(min=0).mean(2)  # [B,k,T,T]
            v = v + (v.unsqueeze(-2) @ a_bar).squeeze(-2)
        out[:, k0:k1] = patches(tower, v, grid)
    return out

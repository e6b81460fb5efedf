"""Attention-based baselines: raw attention, rollout, Grad-CAM for ViTs and CheferCAM (GAE).

Definitions: ``../shared/design/methods.md`` ("Baselines"). Every method reads the image through a
*readout row*: the CLS token's attention row for CLS towers; for towers whose embedding comes from an
attention pooler (SigLIP, CoCa), the pooler's attention of its first latent query — the token that plays
the CLS role there. Products of per-block matrices are applied to the readout row from the last block to
the first (``v ← v·M_l``), which equals reading the row of the full product at ``O(T²)`` per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import image_text_logits, logit_scale, query_chunks
from .ops import MeanTokens, SelectToken, cosine_grad, run_backward, run_forward
from .towers import Tower, block_forward

Tensor = torch.Tensor


@dataclass
class AttentionRecord:
    """Attention maps of the selected blocks (and of the pooler), from one forward pass."""

    attn: dict[int, Tensor]  # block index → [B,H,T,T]
    pool_attn: Tensor | None  # [B,H,Q,Tk] when the tower has an attention pooler
    embedding: Tensor | None  # [B,E] (only when the forward went to the end)
    grid: tuple[int, int]


def record_attention(tower: Tower, images: Tensor, layers: list[int], *, to_end: bool,
                     grad: bool = False) -> AttentionRecord:
    """One forward pass keeping the attention of ``layers``. With ``grad``, the graph is recorded from
    the first selected block on, so scores can be differentiated w.r.t. every kept attention map."""
    first = min(layers)
    stop = len(tower.blocks) if to_end else max(layers) + 1
    with torch.no_grad():
        x, grid = tower.embed(images)
        for blk in tower.blocks[:first]:
            x = block_forward(blk, x)[0]
    attn: dict[int, Tensor] = {}
    with torch.set_grad_enabled(grad):
        if grad:
            x = x.detach().requires_grad_(True)
        for i in range(first, stop):
            x, cache = block_forward(tower.blocks[i], x, keep_attn=i in layers)
            if i in layers:
                attn[i] = cache.attn
        pool_attn = embedding = None
        if to_end:
            if tower.pool is not None:
                embedding, _, _, pool_attn = tower.pool.forward(x)
            else:
                embedding = run_forward(tower.head, x)[0]
    return AttentionRecord(attn, pool_attn, embedding, grid)


def score_gradients(model, tower: Tower, rec: AttentionRecord, text: Tensor, layers: list[int],
                    chunk_size: int | None):
    """Yield ``(query slice, {block: ∂s/∂A [k,B,H,T,T]}, ∂s/∂A_pool [k,B,H,Q,Tk] | None)`` per chunk.

    One backward through the shared graph per query chunk (``is_grads_batched``), not one forward per
    query.
    """
    with torch.enable_grad():
        scores = image_text_logits(model, rec.embedding, text)  # [B,K]
    B, K = scores.shape
    targets = [rec.attn[i] for i in layers] + ([rec.pool_attn] if rec.pool_attn is not None else [])
    per_query = sum(t.numel() for t in targets)
    for sl in query_chunks(K, per_query, chunk_size, scores.device):
        k0, k1 = sl.start, sl.stop
        go = scores.new_zeros(k1 - k0, B, K)
        go[torch.arange(k1 - k0), :, torch.arange(k0, k1)] = 1
        grads = torch.autograd.grad(scores, targets, grad_outputs=go, is_grads_batched=True,
                                    retain_graph=k1 < K)
        by_layer = {i: g.detach() for i, g in zip(layers, grads)}
        pool_grad = grads[-1].detach() if rec.pool_attn is not None else None
        yield sl, by_layer, pool_grad


def readout_row(tower: Tower, batch: int, tokens: int) -> Tensor:
    """How a CLS tower's head reads its tokens, as a ``[B,T]`` weight row: one-hot at the CLS token for
    CLS pooling (the ``[CLS, P:]`` row of methods.md), uniform over the averaged tokens for average
    pooling."""
    v = torch.zeros(batch, tokens, dtype=tower.dtype, device=tower.device)
    pooling = next(op for op in tower.head if isinstance(op, (SelectToken, MeanTokens)))
    if isinstance(pooling, SelectToken):
        v[:, pooling.index] = 1
    else:
        v[:, pooling.start :] = 1.0 / (tokens - pooling.start)
    return v


def readout_rows(tower: Tower, tokens: int, device: torch.device) -> Tensor:
    """The token rows the head of a CLS tower reads (those where :func:`readout_row` is non-zero), from
    the head's structure: the CLS token, or the averaged tokens."""
    pooling = next(op for op in tower.head if isinstance(op, (SelectToken, MeanTokens)))
    if isinstance(pooling, SelectToken):
        return torch.tensor([pooling.index % tokens], device=device)
    return torch.arange(pooling.start, tokens, device=device)


def readout(tower: Tower, rec: AttentionRecord, pool_row: Tensor | None = None) -> Tensor:
    """Initial readout vector over all ``T`` tokens: :func:`readout_row` for CLS towers; for an
    attention pooler its row ``pool_row`` (``[..., B, Tk]``) placed on the tokens it attends to."""
    T = tower.num_prefix + rec.grid[0] * rec.grid[1]
    if tower.pool is None:
        return readout_row(tower, next(iter(rec.attn.values())).shape[0], T)
    assert pool_row is not None
    out = pool_row.new_zeros(*pool_row.shape[:-1], T)
    out[..., tower.pool.key_start :] = pool_row
    return out


def patches(tower: Tower, row: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch columns of a readout row ``[..., T]`` → ``[..., gh, gw]``."""
    n = grid[0] * grid[1]
    return row[..., row.shape[-1] - n :].reshape(*row.shape[:-1], *grid)


def raw_attention(tower: Tower, images: Tensor, layers: list[int]) -> Tensor:
    """Mean over heads of the readout row of the attention, averaged over the selected blocks
    (default: the last block). Pooler towers use the pooler's attention on the final tokens."""
    if tower.pool is not None:
        rec = record_attention(tower, images, [len(tower.blocks) - 1], to_end=True)
        row = rec.pool_attn.mean(1)[:, 0]  # [B,Tk]
        return patches(tower, row, rec.grid).unsqueeze(1)
    rec = record_attention(tower, images, layers, to_end=False)
    r = readout(tower, rec).unsqueeze(-2)  # [B,1,T]
    row = torch.stack([(r @ rec.attn[i].mean(1)).squeeze(-2) for i in layers]).mean(0)
    return patches(tower, row, rec.grid).unsqueeze(1)


def rollout(tower: Tower, images: Tensor, layers: list[int]) -> Tensor:
    """Attention rollout (Abnar & Zuidema): ``Â = rownorm(mean_h A + I)``, product over the selected
    blocks, readout row (CLS, or the pooler row of the final tokens)."""
    rec = record_attention(tower, images, layers, to_end=tower.pool is not None)
    v = readout(tower, rec, None if rec.pool_attn is None else rec.pool_attn.mean(1)[:, 0])
    for i in sorted(layers, reverse=True):
        a = rec.attn[i].mean(1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        v = (v.unsqueeze(-2) @ a).squeeze(-2)
    return patches(tower, v, rec.grid).unsqueeze(1)


def last_block_readout(model, tower: Tower, images: Tensor, text: Tensor, chunk_size: int | None):
    """CLS towers, last block: the readout rows of ``∂score/∂A`` in closed form, no autograd.

    Only the rows the head reads (the CLS row; the patch rows for average pooling) reach the score, so
    the backward runs on those rows alone. Returns ``(grid, rows, weights [B,R], A[rows] [B,H,R,T])``
    and a generator of ``(query slice, ∂s/∂A[rows] [B,k,H,R,T])``.
    """
    with torch.no_grad():
        x, grid = tower.embed(images)
        for blk in tower.blocks[:-1]:
            x = block_forward(blk, x)[0]
        blk = tower.blocks[-1]
        z, cache = block_forward(blk, x, keep_attn=True)
        f, head_cache = run_forward(tower.head, z)
        B, T, _ = z.shape
        r = readout_row(tower, B, T)
        rows = readout_rows(tower, T, r.device)
        _, mlp_rows = blk.mlp.forward(cache.x_mid[:, rows])  # caches of the rows that matter
        v_t = cache.v.transpose(-1, -2).unsqueeze(1)  # [B,1,H,d,T]
        scale = logit_scale(model, f.dtype)

    def grads():
        with torch.no_grad():
            for sl in query_chunks(text.shape[0], B * blk.heads * len(rows) * T, chunk_size, images.device):
                g_f = cosine_grad(f, text[sl])[0] * scale
                g_z = run_backward(tower.head, head_cache, g_f)  # [B,k,T|1,D]
                g_z = g_z[:, :, rows] if g_z.shape[2] > 1 else g_z.expand(-1, -1, len(rows), -1)
                g_mid = blk.mlp.backward(g_z, mlp_rows)
                if blk.gamma1 is not None:
                    g_mid = g_mid * blk.gamma1
                g_ctx = blk.out.backward(g_mid, None)
                g_ctx = g_ctx.reshape(B, g_ctx.shape[1], len(rows), blk.heads, -1).transpose(2, 3)
                yield sl, g_ctx @ v_t  # [B,k,H,R,T]

    return grid, rows, r[:, rows], cache.attn[:, :, rows], grads()


def pooler_gradients(model, tower: Tower, images: Tensor, text: Tensor, chunk_size: int | None):
    """Pooler towers: ``∂score/∂A_pool[h, 0, :]`` in closed form. Returns ``(grid, A_pool[:, :, 0]
    [B,H,Tk])`` and a generator of ``(query slice, gradient [B,k,H,Tk])``."""
    pool = tower.pool
    with torch.no_grad():
        x, grid = tower.embed(images)
        for blk in tower.blocks:
            x = block_forward(blk, x)[0]
        f, v, tail_cache, attn = pool.forward(x)
        B, H, Tk, _ = v.shape
        scale = logit_scale(model, f.dtype)

    def grads():
        with torch.no_grad():
            for sl in query_chunks(text.shape[0], B * H * Tk, chunk_size, images.device):
                g_o = run_backward(pool.tail, tail_cache, cosine_grad(f, text[sl])[0] * scale)
                g_o0 = g_o[:, :, 0].reshape(B, g_o.shape[1], H, -1)
                yield sl, torch.einsum("bkhd,bhtd->bkht", g_o0, v)

    return grid, attn[:, :, 0], grads()


def _scatter(out: Tensor | None, rows: Tensor, sl: slice, K: int, tower: Tower, grid) -> Tensor:
    maps = patches(tower, rows, grid)  # [B,k,gh,gw]
    out = maps.new_zeros(maps.shape[0], K, *grid) if out is None else out
    out[:, sl] = maps
    return out


def gradcam(model, tower: Tower, images: Tensor, text: Tensor, layers: list[int],
            chunk_size: int | None) -> Tensor:
    """Grad-CAM on attention, as Chefer et al. publish it (``generate_cam_attn``): per head, the weight is
    the score's gradient w.r.t. the attention averaged over the readout row's patch columns (the class
    token's and other prefix columns left out); map = ``max(mean_h(w_h·A_h), 0)`` on the readout row;
    selected blocks summed.

    Pooler towers use the pooler's attention; CLS towers with the default (last block) run in closed
    form on the readout rows only; other block selections use autograd."""
    K = text.shape[0]
    out = None
    if tower.pool is not None:
        grid, a, gen = pooler_gradients(model, tower, images, text, chunk_size)
        n = grid[0] * grid[1]
        for sl, g in gen:
            w = g[..., -n:].mean(-1, keepdim=True)  # [B,k,H,1]: the patch columns
            out = _scatter(out, (w * a.unsqueeze(1)).mean(2).clamp(min=0), sl, K, tower, grid)
        return out
    if layers == [len(tower.blocks) - 1]:
        grid, rows, weights, a_rows, gen = last_block_readout(model, tower, images, text, chunk_size)
        wr = weights[:, None, :, None]  # [B,1,R,1]
        a = (wr * a_rows).sum(-2)  # [B,H,T]: readout row of each head
        n = grid[0] * grid[1]
        for sl, g in gen:
            w = (wr.unsqueeze(1) * g).sum(-2)[..., -n:].mean(-1, keepdim=True)  # [B,k,H,1]: the patch columns
            out = _scatter(out, (w * a.unsqueeze(1)).mean(2).clamp(min=0), sl, K, tower, grid)
        return out
    rec = record_attention(tower, images, layers, to_end=True, grad=True)
    r = readout(tower, rec)[:, None, None, :]  # [B,1,1,T]
    n = rec.grid[0] * rec.grid[1]
    for sl, grads, _ in score_gradients(model, tower, rec, text, layers, chunk_size):
        row = 0
        for i in layers:
            a = (r @ rec.attn[i].detach()).squeeze(-2)  # [B,H,T]
            w = (r @ grads[i]).squeeze(-2)[..., -n:].mean(-1, keepdim=True)  # [k,B,H,1]: the patch columns
            row = row + (w * a).mean(2).clamp(min=0)
        out = _scatter(out, row.transpose(0, 1), sl, K, tower, rec.grid)
    return out


def chefercam(model, tower: Tower, images: Tensor, text: Tensor, layers: list[int],
              chunk_size: int | None) -> Tensor:
    """CheferCAM / GAE (Chefer et al., ICCV 2021), the rule of their CLIP notebook: score =
    ``logit_scale·cos``; ``R = I``; per selected block ``R ← R + Ā R`` with ``Ā = mean_h max(∇A ⊙ A, 0)``;
    map = readout row of ``R``. Pooler towers start from ``mean_h max(∇A_pool ⊙ A_pool, 0)``.

    CLS towers with the default (last block) run in closed form on the readout rows; otherwise one
    backward through the shared graph per query chunk."""
    K = text.shape[0]
    out = None
    if tower.pool is None and layers == [len(tower.blocks) - 1]:
        grid, rows, weights, a_rows, gen = last_block_readout(model, tower, images, text, chunk_size)
        T = a_rows.shape[-1]
        base = torch.zeros(weights.shape[0], T, dtype=weights.dtype, device=weights.device)
        base[:, rows] = weights
        for sl, g in gen:
            a_bar = (g * a_rows.unsqueeze(1)).clamp(min=0).mean(2)  # [B,k,R,T]
            row = base.unsqueeze(1) + (weights[:, None, :, None] * a_bar).sum(-2)
            out = _scatter(out, row, sl, K, tower, grid)
        return out
    rec = record_attention(tower, images, layers, to_end=True, grad=True)
    for sl, grads, pool_grad in score_gradients(model, tower, rec, text, layers, chunk_size):
        pool_row = None
        if pool_grad is not None:
            pool_row = (pool_grad * rec.pool_attn.detach()).clamp(min=0).mean(2)[:, :, 0]  # [k,B,Tk]
        v = readout(tower, rec, pool_row)
        if pool_row is None:
            v = v.expand(sl.stop - sl.start, *v.shape)
        for i in sorted(layers, reverse=True):
            a_bar = (grads[i] * rec.attn[i].detach()).clamp(min=0).mean(2)  # [k,B,T,T]
            v = v + (v.unsqueeze(-2) @ a_bar).squeeze(-2)
        out = _scatter(out, v.transpose(0, 1), sl, K, tower, rec.grid)
    return out

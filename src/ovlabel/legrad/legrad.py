"""LeGrad (Bousselham et al., ICCV 2025), computed in closed form from one forward pass.

For every selected block ``l`` and query ``k`` (``../shared/design/methods.md``, "LeGrad")::

    e^l   = normalize(head(Z^l))            # mean over all tokens → LN_post → Pr   (CLS towers)
                                            # the model's own attention pooler      (SigLIP, CoCa)
    s^l_k = t_k · e^l
    G^l_k = ∂ s^l_k / ∂ A^l                 # A^l: the block's attention (or the pooler's)
    m^l_k = mean over heads and query rows of max(G^l_k, 0), prefix columns dropped

and the map is ``Σ_l m^l_k`` on the patch grid. ``s^l`` depends on ``A^l`` only through the rest of block
``l``, so its gradient is computed per block from that block's cached values, for all queries at once,
with the explicit backward of :mod:`ovlabel.legrad.ops` — no autograd, no per-query forward.

Cost per query and selected block: the MLP backward (``T×4D×D``), the output projection backward
(``T×D×D``) and ``G = g_C Vᵀ`` (``H×T×T×d``), ≈ 0.43× the block's forward for ViT-B-16 at 448 px.
Memory for ``G`` is ``chunk·B·H·T²`` per block; queries are processed in chunks with identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import accumulation_dtype, exporting, query_chunks
from .ops import cosine_grad, run_backward, run_forward
from .towers import Block, BlockCache, Tower, block_forward

Tensor = torch.Tensor

def relu_column_sums(g_ctx: Tensor, v: Tensor, *, batched: bool) -> Tensor:
    """``Σ_h Σ_i max(G[b,k,h,i,j], 0)`` with ``G = g_ctx · vᵀ`` → ``[B,k,T]`` float32.

    ``g_ctx``: ``[B,k,H,T,d]``; ``v``: ``[B,H,T,d]``. ``G`` is ``k·H·T²`` values. The batched form
    materialises it in one matmul (best on GPUs); the looped form computes one ``T×T`` slice at a time,
    transposed so the reduction runs along contiguous memory, and reduces it while it is still in the
    CPU cache — about 4× faster than the batched form on CPUs and ``H·k`` times less memory. Exported
    graphs (dynamic ``k``: no loop over queries) take one head at a time, transposed likewise: ~1.7×
    faster than the batched form in onnxruntime on CPUs and ``H`` times less memory.
    """
    acc = accumulation_dtype(g_ctx.dtype)
    if batched and exporting():
        out = 0
        for h in range(g_ctx.shape[2]):  # the number of heads is fixed by the weights
            g_t = v[:, h].unsqueeze(1) @ g_ctx[:, :, h].transpose(-1, -2)  # [B,k,Tj,Ti] = G[i,j]
            out = out + g_t.clamp(min=0).sum(dim=3, dtype=acc)
        return out
    if batched:
        grad_attn = g_ctx @ v.transpose(-1, -2).unsqueeze(1)
        return grad_attn.clamp_(min=0).sum(dim=(2, 3), dtype=acc)
    B, k, H, T, _ = g_ctx.shape
    out = torch.zeros(B, k, T, dtype=acc, device=g_ctx.device)
    buf = g_ctx.new_empty(T, T)
    for b in range(B):
        for q in range(k):
            for h in range(H):
                torch.mm(v[b, h], g_ctx[b, q, h].T, out=buf)  # buf[j, i] = G[i, j]
                out[b, q] += buf.clamp_(min=0).sum(1, dtype=acc)
    return out


def legrad_grid_maps(
    tower: Tower,
    images: Tensor,
    text: Tensor,
    layers: list[int],
    *,
    chunk_size: int | None = None,
    batched: bool | None = None,
    final_tokens: list | None = None,
    contrast: Contrast | None = None,
) -> Tensor:
    """LeGrad maps on the token grid, summed over ``layers``: ``[B, K, gh, gw]`` float32, unnormalised.
    ``contrast``: explain ``t_k · e`` against background prompts (:class:`Contrast`).

    ``images`` are in the tower's dtype and device, ``text`` ``[K, E]`` unit rows in the same dtype.
    ``batched`` selects how ``∂s/∂A`` is reduced (see :func:`relu_column_sums`); by default looped on
    CPU and batched elsewhere. Both give the same maps. When ``final_tokens`` is a list and the last
    block was run, the final tokens are appended to it (the image embedding comes for free).
    """
    if batched is None:  # the looped form is CPU-only and has Python loops over queries: not for export
        batched = images.device.type != "cpu" or exporting()
    with torch.no_grad():
        x, grid = tower.embed(images)
        B = x.shape[0]
        K = text.shape[0]
        acc = x.new_zeros(B, K, grid[0] * grid[1], dtype=accumulation_dtype(x.dtype))
        selected = set(layers)
        for i, blk in enumerate(tower.blocks[: max(layers) + 1]):
            z, cache = block_forward(blk, x)
            if i in selected:
                acc += _layer_map(tower, blk, cache, z, text, chunk_size, batched, contrast)
            x = z
        if final_tokens is not None and max(layers) == len(tower.blocks) - 1:
            final_tokens.append(x)
        return acc.reshape(B, K, *grid)


@dataclass(frozen=True)
class Contrast:
    """A contrastive target: ``s_k = t_k · e − agg_b (t_b · e)`` over background / negative prompts
    ``prompts`` ``[M, E]`` (unit rows), ``agg`` the mean or the max. Its gradient is LeGrad's with
    ``t_k − mean_b t_b`` (mean) or ``t_k − t_b*`` (max; ``b*`` the prompt closest to the block's
    embedding, per image and block) in place of ``t_k`` — exact, since ``∂(t·e)/∂f`` holds for any ``t``."""

    prompts: Tensor
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.mode not in ("mean", "max"):
            raise ValueError(f"contrast mode must be 'mean' or 'max', got {self.mode!r}")

    def text(self, f: Tensor, t: Tensor) -> Tensor:
        """The vectors to differentiate against for embeddings ``f`` ``[B,E]``: ``[k,E]`` or ``[B,k,E]``."""
        if self.mode == "mean":
            return t - self.prompts.mean(0)
        best = (f @ self.prompts.T).argmax(dim=1)  # same argmax as the cosine's: one positive scale per row
        return t.unsqueeze(0) - self.prompts[best].unsqueeze(1)


@dataclass
class LegradState:
    """What LeGrad keeps from a forward pass to explain queries chosen afterwards: the selected blocks'
    caches and outputs, the token grid, and the final tokens (the image embedding's input)."""

    grid: tuple[int, int]
    blocks: list[tuple[Block, BlockCache, Tensor]]
    tokens: Tensor


def legrad_forward(tower: Tower, images: Tensor, layers: list[int]) -> LegradState:
    """The whole forward pass, keeping what :func:`legrad_maps` needs for ``layers``: so that a target
    chosen from the image embedding (the zero-shot top-1 class) is explained without a second pass."""
    with torch.no_grad():
        x, grid = tower.embed(images)
        kept = []
        for i, blk in enumerate(tower.blocks):
            z, cache = block_forward(blk, x)
            if i in layers:
                kept.append((blk, cache, z))
            x = z
        return LegradState(grid, kept, x)


def legrad_maps(tower: Tower, state: LegradState, text: Tensor, *, chunk_size: int | None = None,
                batched: bool | None = None, contrast: Contrast | None = None) -> Tensor:
    """:func:`legrad_grid_maps` from a :func:`legrad_forward` state → ``[B, K, gh, gw]``."""
    z0 = state.tokens
    if batched is None:
        batched = z0.device.type != "cpu" or exporting()
    with torch.no_grad():
        acc = z0.new_zeros(z0.shape[0], text.shape[0], state.grid[0] * state.grid[1],
                           dtype=accumulation_dtype(z0.dtype))
        for blk, cache, z in state.blocks:
            acc += _layer_map(tower, blk, cache, z, text, chunk_size, batched, contrast)
        return acc.reshape(z0.shape[0], text.shape[0], *state.grid)


def _layer_map(tower: Tower, blk: Block, cache: BlockCache, z: Tensor, text: Tensor,
               chunk_size: int | None, batched: bool, contrast: Contrast | None = None) -> Tensor:
    if tower.pool is not None:
        return _pool_layer_map(tower, z, text, chunk_size, contrast)
    assert tower.legrad_head is not None
    B, T, D = z.shape
    H = blk.heads
    P = tower.num_prefix
    f, head_cache = run_forward(tower.legrad_head, z)
    hidden = blk.mlp.hidden
    per_query = B * (H * T * T if batched else T * max(hidden, D))
    parts = []
    for sl in query_chunks(text.shape[0], per_query, chunk_size, z.device):
        t = text[sl]
        g_f, _ = cosine_grad(f, t if contrast is None else contrast.text(f, t))  # [B,k,E]
        g_z = run_backward(tower.legrad_head, head_cache, g_f)  # [B,k,1,D]: same for every token
        g_mid = blk.mlp.backward(g_z, cache.mlp)  # [B,k,T,D]
        if blk.gamma1 is not None:
            g_mid = g_mid * blk.gamma1
        g_ctx = blk.out.backward(g_mid, None)  # [B,k,T,D]
        g_ctx = g_ctx.reshape(B, t.shape[0], T, H, -1).transpose(2, 3)  # [B,k,H,T,d]
        m = relu_column_sums(g_ctx, cache.v, batched=batched) / (H * T)
        parts.append(m[..., P:])
    return torch.cat(parts, dim=1)


def _pool_layer_map(tower: Tower, z: Tensor, text: Tensor, chunk_size: int | None,
                    contrast: Contrast | None = None) -> Tensor:
    pool = tower.pool
    assert pool is not None
    f, v, tail_cache, _ = pool.forward(z)
    B, H, Tk, _ = v.shape
    offset = tower.num_prefix - pool.key_start  # prefix tokens still among the keys
    parts = []
    for sl in query_chunks(text.shape[0], B * H * Tk, chunk_size, z.device):
        t = text[sl]
        g_f, _ = cosine_grad(f, t if contrast is None else contrast.text(f, t))
        g_o = run_backward(pool.tail, tail_cache, g_f)  # [B,k,Q,Dp]
        g_o0 = g_o[:, :, 0].reshape(B, t.shape[0], H, -1)  # first latent query, per head
        grad_attn = torch.einsum("bkhd,bhtd->bkht", g_o0, v)  # ∂s/∂A_pool[h, 0, :]
        m = grad_attn.clamp_(min=0).sum(dim=2, dtype=accumulation_dtype(v.dtype)) / H
        parts.append(m[..., offset:])
    return torch.cat(parts, dim=1)

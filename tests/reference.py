"""Plain-autograd reference implementations of the explainers' definitions.

Written from ``../shared/design/methods.md`` without any code from ``ovlabel.legrad``: the model's own
modules are called wherever they exist (``blk.ln_1``, ``blk.mlp``, ``attn.out_proj``, ``trunk.attn_pool``
pieces, …), attention probabilities are recomputed explicitly so they can be differentiated, and every
gradient comes from ``torch.autograd.grad`` one query at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------- towers
def _is_timm(model) -> bool:
    return hasattr(model.visual, "trunk")


def _resample(pos_patches: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Positional grid [N, D] resampled with bicubic + antialias (open_clip's and timm's convention)."""
    if tuple(old) == tuple(new):
        return pos_patches
    D = pos_patches.shape[-1]
    img = pos_patches.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new, mode="bicubic", antialias=True, align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(-1, D)


def tokens_in(model, images):
    """Tokens entering block 0, the prefix count and the grid."""
    v = model.visual
    if _is_timm(model):
        t = v.trunk
        x = t.patch_embed.proj(images)
        grid = x.shape[-2:]
        x = t.patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = t.pos_embed[0]
        P = t.num_prefix_tokens
        if not t.no_embed_class:
            pos = torch.cat([pos[:P], _resample(pos[P:], t.patch_embed.grid_size, grid)])
        else:
            pos = _resample(pos, t.patch_embed.grid_size, grid)
        prefix = [p.expand(x.shape[0], -1, -1) for p in (t.cls_token, t.reg_token) if p is not None]
        if t.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return t.norm_pre(x), P, tuple(grid)
    x = v.conv1(images)
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = v.class_embedding.reshape(1, 1, -1).expand(x.shape[0], -1, -1)
    pos = v.positional_embedding
    pos = torch.cat([pos[:1], _resample(pos[1:], v.grid_size, grid)])
    return v.ln_pre(torch.cat([cls, x], dim=1) + pos), 1, tuple(grid)


def blocks(model):
    return list(model.visual.trunk.blocks) if _is_timm(model) else list(model.visual.transformer.resblocks)


def block_explicit(model, blk, x):
    """A block recomputed with explicit attention probabilities. Returns (Z, A, parts)."""
    if _is_timm(model):
        at = blk.attn
        u = blk.norm1(x)
        B, T, D = u.shape
        qkv = at.qkv(u).reshape(B, T, 3, at.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        A = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        ctx = (A @ v).transpose(1, 2).reshape(B, T, D)
        xm = x + blk.ls1(at.proj(ctx))
        z = xm + blk.ls2(blk.mlp(blk.norm2(xm)))
        return z, A, dict(v=v, q=q, k=k)
    mha = blk.attn
    u = blk.ln_1(x)
    B, T, D = u.shape
    H = mha.num_heads
    q, k, v = F.linear(u, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, T, H, -1).transpose(1, 2) for t in (q, k, v))
    A = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    ctx = (A @ v).transpose(1, 2).reshape(B, T, D)
    xm = x + blk.ls_1(mha.out_proj(ctx))
    z = xm + blk.ls_2(blk.mlp(blk.ln_2(xm)))
    return z, A, dict(v=v, q=q, k=k)


def pooler_explicit(model, z):
    """The model's attention pooler on tokens z, with explicit attention. Returns (embedding, A_pool)."""
    v = model.visual
    if _is_timm(model):
        t = v.trunk
        ap = t.attn_pool
        x = t.norm(z)
        if not getattr(t, "pool_include_prefix", False):
            x = x[:, t.num_prefix_tokens:]
        B, N, C = x.shape
        q = ap.q(ap.latent.expand(B, -1, -1)).reshape(B, ap.latent_len, ap.num_heads, -1).transpose(1, 2)
        kv = ap.kv(x).reshape(B, N, 2, ap.num_heads, -1).permute(2, 0, 3, 1, 4)
        A = torch.softmax(q @ kv[0].transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        o = (A @ kv[1]).transpose(1, 2).reshape(B, ap.latent_len, C)
        o = ap.proj(o)
        o = o + ap.mlp(ap.norm(o))
        pooled = o[:, 0]
        return v.head(t.head(t.fc_norm(pooled))), A
    ap = v.attn_pool
    mha = ap.attn
    x = ap.ln_k(z)
    qin = ap.ln_q(ap.query)
    B, N, _ = x.shape
    if mha.in_proj_weight is not None:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    H = mha.num_heads
    q = F.linear(qin, wq, bq).reshape(1, -1, H, mha.head_dim).transpose(1, 2)
    k = F.linear(x, wk, bk).reshape(B, N, H, -1).transpose(1, 2)
    vv = F.linear(x, wv, bv).reshape(B, N, H, -1).transpose(1, 2)
    A = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    o = (A @ vv).transpose(1, 2).reshape(B, -1, mha.embed_dim)
    o = v.ln_post(mha.out_proj(o))
    return o[:, 0] @ v.proj, A


def has_pooler(model) -> bool:
    return _is_timm(model) or model.visual.attn_pool is not None


def upsample_minmax(grid_maps, patch):
    B, K, gh, gw = grid_maps.shape
    up = F.interpolate(grid_maps, size=(gh * patch[0], gw * patch[1]), mode="bilinear", align_corners=False)
    out = torch.zeros_like(up)
    for b in range(B):
        for k in range(K):
            m = up[b, k]
            if m.max() > m.min():
                out[b, k] = (m - m.min()) / (m.max() - m.min())
    return out


def patch_size(model):
    v = model.visual
    return tuple(v.trunk.patch_embed.patch_size) if _is_timm(model) else tuple(v.conv1.kernel_size)


# ---------------------------------------------------------------------------------------------- LeGrad
def legrad(model, images, text, layers):
    """LeGrad by its definition, one autograd call per (layer, query)."""
    text = F.normalize(text, dim=-1)
    x, P, grid = tokens_in(model, images)
    B, K = images.shape[0], text.shape[0]
    total = torch.zeros(B, K, grid[0] * grid[1], dtype=images.dtype)
    for i, blk in enumerate(blocks(model)):
        xin = x.detach()
        z, A, _ = block_explicit(model, blk, xin)
        if i in layers:
            if has_pooler(model):
                f, Ap = pooler_explicit(model, z)
                e = F.normalize(f, dim=-1)
                for k in range(K):
                    s = (e @ text[k]).sum()
                    g = torch.autograd.grad(s, Ap, retain_graph=True)[0]  # [B,H,Q,N]
                    m = g[:, :, 0, :].clamp(min=0).mean(1)
                    total[:, k] += m[:, m.shape[-1] - grid[0] * grid[1]:]
            else:
                v = model.visual
                u = z.mean(1)
                e = F.normalize(v.ln_post(u) @ v.proj, dim=-1)
                for k in range(K):
                    s = (e @ text[k]).sum()
                    g = torch.autograd.grad(s, A, retain_graph=True)[0]  # [B,H,T,T]
                    m = g.clamp(min=0).mean(dim=(1, 2))
                    total[:, k] += m[:, P:]
        with torch.no_grad():
            x = blk(xin)
    return upsample_minmax(total.reshape(B, K, *grid), patch_size(model))

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
def legrad(model, images, text, layers, background=None, mode="max"):
    """LeGrad by its definition, one autograd call per (layer, query). With ``background`` prompts the
    score is ``t_k·e − agg_b(t_b·e)`` (agg: mean or max over the prompts)."""
    text = F.normalize(text, dim=-1)
    bg = None if background is None else F.normalize(background, dim=-1)

    def score(e, k):
        s = e @ text[k]
        if bg is not None:
            sb = e @ bg.T  # [B,M]
            s = s - (sb.mean(1) if mode == "mean" else sb.max(1).values)
        return s.sum()

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
                    s = score(e, k)
                    g = torch.autograd.grad(s, Ap, retain_graph=True)[0]  # [B,H,Q,N]
                    m = g[:, :, 0, :].clamp(min=0).mean(1)
                    total[:, k] += m[:, m.shape[-1] - grid[0] * grid[1]:]
            else:
                v = model.visual
                u = z.mean(1)
                e = F.normalize(v.ln_post(u) @ v.proj, dim=-1)
                for k in range(K):
                    s = score(e, k)
                    g = torch.autograd.grad(s, A, retain_graph=True)[0]  # [B,H,T,T]
                    m = g.clamp(min=0).mean(dim=(1, 2))
                    total[:, k] += m[:, P:]
        with torch.no_grad():
            x = blk(xin)
    return upsample_minmax(total.reshape(B, K, *grid), patch_size(model))


# ------------------------------------------------------------------------------------- attention baselines
def forward_explicit(model, images, grad_from=None):
    """All blocks with explicit attention; the graph is kept from block ``grad_from`` on.
    Returns (final tokens, [A per block], P, grid)."""
    x, P, grid = tokens_in(model, images)
    attns = []
    for i, blk in enumerate(blocks(model)):
        if grad_from is not None and i == grad_from:
            x = x.detach().requires_grad_(True)
        if grad_from is None or i < grad_from:
            with torch.no_grad():
                x, A, _ = block_explicit(model, blk, x)
        else:
            x, A, _ = block_explicit(model, blk, x)
        attns.append(A)
    return x, attns, P, grid


def embedding_and_pool_attention(model, tokens):
    """The model's own image embedding from final tokens (and the pooler's attention, if any)."""
    if has_pooler(model):
        return pooler_explicit(model, tokens)
    v = model.visual
    pooled, _ = v._pool(tokens)
    return pooled @ v.proj, None


def logits(model, emb, text):
    s = F.normalize(emb, dim=-1) @ F.normalize(text, dim=-1).T * model.logit_scale.exp()
    if getattr(model, "logit_bias", None) is not None:
        s = s + model.logit_bias
    return s


def readout_vector(model, T):
    """CLS one-hot for 'tok' pooling, uniform over patches for 'avg' pooling."""
    r = torch.zeros(T, dtype=torch.float64)
    if model.visual.pool_type == "avg":
        r[1:] = 1.0 / (T - 1)
    else:
        r[0] = 1
    return r


def _finish(rows, model, grid):
    return upsample_minmax(rows[..., rows.shape[-1] - grid[0] * grid[1]:].reshape(*rows.shape[:2], *grid),
                           patch_size(model))


def pooler_readout(model, row_keys, T):
    """Place a pooler row over keys on all T tokens."""
    out = torch.zeros(*row_keys.shape[:-1], T, dtype=row_keys.dtype)
    out[..., T - row_keys.shape[-1]:] = row_keys
    return out


def raw_attention(model, images):
    tokens, attns, P, grid = forward_explicit(model, images)
    if has_pooler(model):
        _, Ap = embedding_and_pool_attention(model, tokens)
        return _finish(Ap.detach().mean(1)[:, 0].unsqueeze(1), model, grid)
    r = readout_vector(model, attns[-1].shape[-1])
    return _finish((r @ attns[-1].detach().mean(1)).unsqueeze(1), model, grid)


def rollout(model, images):
    tokens, attns, P, grid = forward_explicit(model, images)
    T = attns[0].shape[-1]
    R = torch.eye(T, dtype=torch.float64).expand(images.shape[0], T, T)
    for A in attns:
        a = A.detach().mean(1) + torch.eye(T, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        R = a @ R
    if has_pooler(model):
        _, Ap = embedding_and_pool_attention(model, tokens)
        r = pooler_readout(model, Ap.detach().mean(1)[:, 0], T)  # [B,T]
    else:
        r = readout_vector(model, T).expand(images.shape[0], T)
    return _finish((r.unsqueeze(1) @ R), model, grid)


def gradcam(model, images, text, layers=None):
    """w_h = mean over the readout row's patch columns of dS/dA_h (Chefer et al.'s generate_cam_attn: the
    class token's column left out); relu(mean_h w_h A_h) on the readout row, summed over the selected blocks
    (default: the last block; pooler towers: the pooler's attention)."""
    n = len(blocks(model))
    layers = [n - 1] if layers is None else list(layers)
    tokens, attns, P, grid = forward_explicit(model, images, grad_from=min(layers))
    emb, Ap = embedding_and_pool_attention(model, tokens)
    s = logits(model, emb, text)
    B, K = s.shape
    npatch = grid[0] * grid[1]
    rows = torch.zeros(B, K, attns[-1].shape[-1] if Ap is None else Ap.shape[-1], dtype=torch.float64)
    for k in range(K):
        targets = [Ap] if Ap is not None else [attns[i] for i in layers]
        grads = torch.autograd.grad(s[:, k].sum(), targets, retain_graph=True)
        for b in range(B):
            if Ap is not None:
                w = grads[0][b, :, 0, -npatch:].mean(-1)  # [H]
                a = Ap[b, :, 0].detach()
                rows[b, k] = (w[:, None] * a).mean(0).clamp(min=0)
                continue
            r = readout_vector(model, grads[0].shape[-1])
            for i, g in zip(layers, grads):
                w = (r @ g[b])[:, -npatch:].mean(-1)
                a = r @ attns[i][b].detach()
                rows[b, k] += (w[:, None] * a).mean(0).clamp(min=0)
    return _finish(rows, model, grid)


def chefercam(model, images, text, layers):
    """R = I; R <- R + mean_h relu(grad A * A) R over the selected blocks; readout row."""
    tokens, attns, P, grid = forward_explicit(model, images, grad_from=min(layers))
    emb, Ap = embedding_and_pool_attention(model, tokens)
    s = logits(model, emb, text)
    B, K = s.shape
    T = attns[0].shape[-1]
    rows = torch.zeros(B, K, T, dtype=torch.float64)
    for k in range(K):
        for b in range(B):
            targets = [attns[i] for i in layers] + ([Ap] if Ap is not None else [])
            grads = torch.autograd.grad(s[b, k], targets, retain_graph=True)
            R = torch.eye(T, dtype=torch.float64)
            for i, g in zip(layers, grads):
                a_bar = (g[b] * attns[i][b].detach()).clamp(min=0).mean(0)
                R = R + a_bar @ R
            if Ap is not None:
                r = pooler_readout(model, (grads[-1][b] * Ap[b].detach()).clamp(min=0).mean(0)[0], T)
            else:
                r = readout_vector(model, T)
            rows[b, k] = r @ R
    return _finish(rows, model, grid)


# ------------------------------------------------------------------------------ Chefer 2021 LRP (Chefer-style)
def safe_divide(a, b):
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _gradprop(Z, X, S):
    return torch.autograd.grad(Z, X, S, retain_graph=True)


def relprop_linear(R, x, w):
    """alpha=1, beta=0 as in Chefer's layers_ours.Linear.relprop (bias ignored)."""
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    px = x.clamp(min=0).detach().requires_grad_(True)
    nx = x.clamp(max=0).detach().requires_grad_(True)
    with torch.enable_grad():
        Z1, Z2 = F.linear(px, pw), F.linear(nx, nw)
        S = safe_divide(R, Z1 + Z2)
        return (px * _gradprop(Z1, px, S)[0] + nx * _gradprop(Z2, nx, S)[0]).detach()


def relprop_add(R, x0, x1):
    """Chefer's Add.relprop: z-rule, then each branch rescaled to its share of the total."""
    x0 = x0.detach().requires_grad_(True)
    x1 = x1.detach().requires_grad_(True)
    with torch.enable_grad():
        Z = x0 + x1
        S = safe_divide(R, Z)
        C = _gradprop(Z, [x0, x1], S)
    a, b = (x0 * C[0]).detach(), (x1 * C[1]).detach()
    a_sum, b_sum = a.sum(), b.sum()
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
    return a * safe_divide(a_fact, a.sum()), b * safe_divide(b_fact, b.sum())


def relprop_matmul(R, X, Y):
    """Chefer's einsum relprop (RelPropSimple on two operands), each share halved."""
    X = X.detach().requires_grad_(True)
    Y = Y.detach().requires_grad_(True)
    with torch.enable_grad():
        Z = X @ Y
        S = safe_divide(R, Z)
        C = _gradprop(Z, [X, Y], S)
    return (X * C[0]).detach() / 2, (Y * C[1]).detach() / 2


def _merge(t):
    """[1,H,T,d] -> [1,T,H*d]"""
    return t.transpose(1, 2).reshape(1, t.shape[2], -1)


def chefer_lrp(model, images, text, layers):
    """Chefer 2021 for an open_clip CLS ViT, one image and one query at a time."""
    v = model.visual
    outs = []
    for b in range(images.shape[0]):
        img = images[b : b + 1]
        x, P, grid = tokens_in(model, img)
        x = x.detach()
        states = []
        for i, blk in enumerate(blocks(model)):
            if i == min(layers):
                x = x.detach().requires_grad_(True)
            st = {"x": x}
            mha = blk.attn
            u1 = blk.ln_1(x)
            H = mha.num_heads
            qkv = F.linear(u1, mha.in_proj_weight, mha.in_proj_bias)
            q, k, vv = (t.reshape(1, -1, H, mha.head_dim).transpose(1, 2) for t in qkv.chunk(3, -1))
            A = torch.softmax((q @ k.transpose(-1, -2)) / mha.head_dim ** 0.5, dim=-1)
            ctx = A @ vv
            ctxm = ctx.transpose(1, 2).reshape(1, -1, H * mha.head_dim)
            o = mha.out_proj(ctxm)
            xm = x + blk.ls_1(o)
            u2 = blk.ln_2(xm)
            a = blk.mlp.c_fc(u2)
            h = blk.mlp.gelu(a)
            m = blk.mlp.c_proj(h)
            z = xm + blk.ls_2(m)
            st.update(u1=u1, q=q, k=k, v=vv, A=A, ctxm=ctxm, o=blk.ls_1(o), xm=xm, u2=u2, h=h, m=blk.ls_2(m))
            states.append(st)
            x = z
        tokens = x
        pooled, _ = v._pool(tokens)
        emb = pooled @ v.proj
        scores = logits(model, emb, text)[0]
        T = tokens.shape[1]
        rows = []
        for kk in range(text.shape[0]):
            grads = torch.autograd.grad(scores[kk], [states[i]["A"] for i in layers], retain_graph=True)
            e = F.normalize(emb, dim=-1).detach()
            w = (model.logit_scale.exp() * F.normalize(text[kk], dim=-1)).detach()[None]
            R = relprop_linear(torch.ones(1, 1, dtype=torch.float64), e, w)  # score; L2 norm: identity
            if v.final_ln_after_pool:  # pool -> ln_post -> proj
                pooled_raw = tokens[:, 1:].mean(1) if v.pool_type == "avg" else tokens[:, 0]
                R = relprop_linear(R, v.ln_post(pooled_raw).detach(), v.proj.T.detach())
                if v.pool_type == "avg":
                    wt = torch.zeros(1, T, dtype=torch.float64)
                    wt[0, 1:] = 1.0 / (T - 1)
                    Rt = relprop_linear(R[0][:, None], tokens[0].T.detach(), wt)  # [D,T]
                    R = Rt.T[None]
                else:
                    Rt = torch.zeros(1, T, R.shape[-1], dtype=torch.float64)
                    Rt[:, 0] = R
                    R = Rt
            else:  # ln_post -> pool (tok) -> proj
                R = relprop_linear(R, v.ln_post(tokens)[:, 0].detach(), v.proj.T.detach())
                Rt = torch.zeros(1, T, R.shape[-1], dtype=torch.float64)
                Rt[:, 0] = R
                R = Rt
            r_attn = {}
            for i in range(len(states) - 1, min(layers) - 1, -1):
                st, blk = states[i], blocks(model)[i]
                r_res, r_mlp = relprop_add(R, st["xm"], st["m"])
                r_h = relprop_linear(r_mlp, st["h"], blk.mlp.c_proj.weight)
                r_u2 = relprop_linear(r_h, st["u2"], blk.mlp.c_fc.weight)
                r_mid = r_res + r_u2
                r_x, r_o = relprop_add(r_mid, st["x"], st["o"])
                r_ctx = relprop_linear(r_o, st["ctxm"], blk.attn.out_proj.weight)
                H = blk.attn.num_heads
                r_ctx = r_ctx.reshape(1, T, H, -1).transpose(1, 2)
                r_A, r_v = relprop_matmul(r_ctx, st["A"], st["v"])
                r_attn[i] = r_A
                r_q, r_kt = relprop_matmul(r_A, st["q"], st["k"].transpose(-1, -2))
                r_qkv = torch.cat([_merge(r_q), _merge(r_kt.transpose(-1, -2)), _merge(r_v)], -1)
                r_u1 = relprop_linear(r_qkv, st["u1"], blk.attn.in_proj_weight)
                R = r_x + r_u1
            C = torch.eye(T, dtype=torch.float64)
            for i, g in zip(layers, grads):
                a_bar = torch.eye(T, dtype=torch.float64) + (g[0] * r_attn[i][0]).clamp(min=0).mean(0)
                C = a_bar @ C
            rows.append(readout_vector(model, T) @ C)
        outs.append(torch.stack(rows))
    rows = torch.stack(outs)
    return _finish(rows, model, grid)

"""Read an open_clip image tower into a plain description the explainers can run.

An adapter walks the model's modules once and copies *references* to their parameters (``detach()``-ed
views, no copies, no ``requires_grad`` changes) into frozen dataclasses: patch embedding, prefix tokens,
positional embedding, blocks and heads. The explainers then run the tower functionally from that
description, so they can keep what they need (attention maps, values, MLP pre-activations) without hooks
and without patching anything onto third-party modules.

Supported towers:

* open_clip ``VisionTransformer`` — CLS prefix token, ``tok``/``avg`` pooling, optional LayerScale,
  GELU/QuickGELU, and the original CoCa attentional pooler;
* open_clip ``TimmModel`` whose trunk is a timm ``VisionTransformer`` with a MAP attention-pool head
  (``global_pool='map'``: SigLIP, SigLIP2).

Anything else raises :class:`~ovlabel.errors.UnsupportedModelError` naming what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .ops import (
    Activation,
    LayerNorm,
    Linear,
    MeanTokens,
    Mlp,
    Op,
    SelectToken,
    run_forward,
)

Tensor = torch.Tensor

SUPPORTED_TOWERS = (
    "open_clip VisionTransformer (CLS token; tok/avg pooling or the CoCa attentional pooler)",
    "open_clip TimmModel with a timm VisionTransformer trunk and a MAP attention-pool head (SigLIP, SigLIP2)",
)


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what}. ovlabel explains these image towers: " + "; ".join(SUPPORTED_TOWERS) + "."
    )


# --------------------------------------------------------------------------------------------------
# Description
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One pre-norm transformer block: ``X' = X + γ1·Attn(LN1(X))``; ``Z = X' + γ2·MLP(LN2(X'))``."""

    ln1: LayerNorm
    qkv: Linear  # D → 3D, [q; k; v]
    heads: int
    out: Linear  # D → D
    gamma1: Tensor | None
    mlp: Mlp  # LN2 → fc1 → act → fc2 (→ γ2)

    @property
    def width(self) -> int:
        return self.out.weight.shape[0]


@dataclass(frozen=True)
class AttnPool:
    """Attention pooling: learned latent queries attend over the tokens, then a small tail.

    ``pre`` is applied to the tokens before keys and values are computed (the trunk's final norm, or
    CoCa's ``ln_k``); ``key_start`` drops leading prefix tokens from the keys when the model does;
    ``tail`` maps the concatenated head outputs ``[B, Q, Dp]`` to the image embedding ``[B, E]``.
    """

    pre: tuple[Op, ...]
    key_start: int
    query: Tensor  # [Q, Dp], projected
    k: Linear
    v: Linear
    heads: int
    tail: tuple[Op, ...]

    def keys_values(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries ``[1,H,Q,d]``, keys and values ``[B,H,Tk,d]``."""
        x, _ = run_forward(self.pre, tokens[:, self.key_start :])
        B, T, _ = x.shape
        H = self.heads
        k = self.k.forward(x)[0].reshape(B, T, H, -1).transpose(1, 2)
        v = self.v.forward(x)[0].reshape(B, T, H, -1).transpose(1, 2)
        q = self.query.reshape(1, self.query.shape[0], H, -1).transpose(1, 2)
        return q, k, v

    def attention(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Pooler attention ``A_pool [B,H,Q,Tk]`` and values ``[B,H,Tk,d]``."""
        q, k, v = self.keys_values(tokens)
        scale = q.shape[-1] ** -0.5
        attn = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)
        return attn, v

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, list[Any], Tensor]:
        """Embedding ``[B,E]``, with what a backward needs: values, tail caches and ``A_pool``."""
        attn, v = self.attention(tokens)
        B, H, Q, _ = attn.shape
        o = (attn @ v).transpose(1, 2).reshape(B, Q, -1)
        f, caches = run_forward(self.tail, o)
        return f, v, caches, attn


@dataclass(frozen=True)
class Tower:
    """A ViT image tower, read from a model. See the module docstring."""

    name: str
    patch_size: tuple[int, int]
    native_grid: tuple[int, int]
    patch_weight: Tensor
    patch_bias: Tensor | None
    patch_norm: LayerNorm | None
    prefix: Tensor | None  # [P, D]: class token, registers
    pos_embed: Tensor | None  # [P + N0, D] when pos_covers_prefix else [N0, D]
    pos_covers_prefix: bool
    pre_norm: LayerNorm | None
    blocks: tuple[Block, ...]
    head: tuple[Op, ...] | None  # final tokens → embedding, when the head is not an attention pool
    pool: AttnPool | None  # attention-pool head (CoCa, SigLIP)
    legrad_head: tuple[Op, ...] | None  # mean over all tokens → LN_post → Pr (CLS towers)
    has_cls: bool

    @property
    def num_prefix(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_weight.device

    # ----------------------------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size[0], width // self.patch_size[1]

    def positional(self, grid: tuple[int, int]) -> Tensor | None:
        """Positional embedding for a token grid, resampled when it differs from the native grid.

        Bicubic with antialiasing and ``align_corners=False`` — what open_clip's ``resize_pos_embed`` and
        timm's ``resample_abs_pos_embed`` use — computed on a new tensor; the model is never touched.
        """
        pos = self.pos_embed
        if pos is None:
            return pos
        # (exported graphs always resample — an identity at the native grid — so that no branch depends on
        # a symbolic size)
        if not torch.compiler.is_exporting() and tuple(grid) == tuple(self.native_grid):
            return pos
        n_prefix = self.num_prefix if self.pos_covers_prefix else 0
        head, body = pos[:n_prefix], pos[n_prefix:]
        gh0, gw0 = self.native_grid
        work = torch.float64 if body.dtype == torch.float64 else torch.float32
        img = body.to(work).reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
        body = img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([head, body], dim=0)

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embedding + prefix tokens + positional embedding + pre-norm → ``[B,T,D]``."""
        x = F.conv2d(images, self.patch_weight, self.patch_bias, stride=self.patch_size)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if self.patch_norm is not None:
            x = self.patch_norm.forward(x)[0]
        pos = self.positional(grid)
        prefix = None if self.prefix is None else self.prefix.to(x.dtype).expand(x.shape[0], -1, -1)
        if self.pos_covers_prefix:
            if prefix is not None:
                x = torch.cat([prefix, x], dim=1)
            if pos is not None:
                x = x + pos.to(x.dtype)
        else:
            if pos is not None:
                x = x + pos.to(x.dtype)
            if prefix is not None:
                x = torch.cat([prefix, x], dim=1)
        if self.pre_norm is not None:
            x = self.pre_norm.forward(x)[0]
        return x, grid

    def embedding(self, tokens: Tensor) -> Tensor:
        """The model's own image embedding (unnormalised) from the final tokens."""
        if self.pool is not None:
            return self.pool.forward(tokens)[0]
        assert self.head is not None
        return run_forward(self.head, tokens)[0]

    def encode(self, images: Tensor) -> Tensor:
        """Equivalent of ``model.encode_image(images)`` (unnormalised), run from this description."""
        x, _ = self.embed(images)
        for blk in self.blocks:
            x = block_forward(blk, x)[0]
        return self.embedding(x)


# --------------------------------------------------------------------------------------------------
# Running a block
# --------------------------------------------------------------------------------------------------


@dataclass
class BlockCache:
    """What a block keeps for explainers: values, MLP caches and (optionally) attention."""

    v: Tensor  # [B,H,T,d]
    mlp: list[Any]
    attn: Tensor | None = None  # [B,H,T,T]
    x_mid: Tensor | None = None  # [B,T,D]: the residual stream between attention and MLP


def split_heads(x: Tensor, heads: int) -> Tensor:
    B, T, D = x.shape
    return x.reshape(B, T, heads, D // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


def block_qkv(blk: Block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u = blk.ln1.forward(x)[0]
    q, k, v = blk.qkv.forward(u)[0].chunk(3, dim=-1)
    return split_heads(q, blk.heads), split_heads(k, blk.heads), split_heads(v, blk.heads)


def block_attention(q: Tensor, k: Tensor) -> Tensor:
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)


def block_finish(blk: Block, x: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor, list[Any]]:
    """From the attention context ``C`` (heads merged): ``X'`` and ``Z`` with the MLP caches."""
    a = blk.out.forward(ctx)[0]
    if blk.gamma1 is not None:
        a = a * blk.gamma1
    x_mid = x + a
    z, mlp_cache = blk.mlp.forward(x_mid)
    return x_mid, z, mlp_cache


def block_forward(blk: Block, x: Tensor, *, keep_attn: bool = False) -> tuple[Tensor, BlockCache]:
    """Run one block. ``keep_attn`` materialises the attention probabilities (and keeps them in the
    cache); otherwise a fused attention kernel is used."""
    q, k, v = block_qkv(blk, x)
    if keep_attn:
        attn = block_attention(q, k)
        ctx = attn @ v
    else:
        attn = None
        ctx = F.scaled_dot_product_attention(q, k, v)
    x_mid, z, mlp_cache = block_finish(blk, x, merge_heads(ctx))
    return z, BlockCache(v=v, mlp=mlp_cache, attn=attn, x_mid=x_mid)


# --------------------------------------------------------------------------------------------------
# Reading modules
# --------------------------------------------------------------------------------------------------


def _d(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _layer_norm(m: nn.Module | None, where: str) -> LayerNorm | None:
    if m is None or isinstance(m, nn.Identity):
        return None
    if isinstance(m, nn.LayerNorm):
        return LayerNorm(_d(m.weight), _d(m.bias), float(m.eps))
    raise _unsupported(f"{where} is a {type(m).__name__}, expected LayerNorm or Identity")


def _linear(m: nn.Module, where: str) -> Linear:
    if isinstance(m, nn.Linear):
        return Linear(_d(m.weight), _d(m.bias))
    raise _unsupported(f"{where} is a {type(m).__name__}, expected Linear")


def _activation(m: nn.Module, where: str) -> Activation:
    name = type(m).__name__
    if isinstance(m, nn.GELU):
        return Activation("gelu_tanh" if m.approximate == "tanh" else "gelu")
    if name == "QuickGELU":
        return Activation("quick_gelu")
    if name == "GELUTanh":
        return Activation("gelu_tanh")
    if name == "GELU" and getattr(m, "approximate", "none") in ("none", None):  # timm.layers.GELU
        return Activation("gelu")
    raise _unsupported(f"{where} uses activation {name}, expected GELU (exact or tanh) or QuickGELU")


def _scale(m: nn.Module) -> Tensor | None:
    if isinstance(m, nn.Identity):
        return None
    gamma = getattr(m, "gamma", None)
    if isinstance(gamma, Tensor):
        return gamma.detach()
    raise _unsupported(f"layer scale {type(m).__name__} is not understood")


def _mlp_branch(norm: nn.Module, fc1: nn.Module, act: nn.Module, fc2: nn.Module, where: str,
                mid_norm: nn.Module | None = None, gamma: Tensor | None = None) -> Mlp:
    ln = _layer_norm(norm, f"{where} norm")
    first, activation = _linear(fc1, f"{where} fc1"), _activation(act, where)
    if mid_norm is not None and not isinstance(mid_norm, nn.Identity):
        raise _unsupported(f"{where} has a norm inside its MLP (scale_fc)")
    return Mlp(ln, first, activation, _linear(fc2, f"{where} fc2"), gamma)


def _mha_projections(attn: nn.MultiheadAttention) -> tuple[Linear, Linear, Linear]:
    D = attn.embed_dim
    bias = _d(attn.in_proj_bias)
    bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
    if attn.in_proj_weight is not None:
        wq, wk, wv = _d(attn.in_proj_weight).chunk(3)
    else:
        wq, wk, wv = _d(attn.q_proj_weight), _d(attn.k_proj_weight), _d(attn.v_proj_weight)
    assert wq.shape[0] == D
    return Linear(wq, bq), Linear(wk, bk), Linear(wv, bv)


def _open_clip_block(blk: nn.Module, i: int) -> Block:
    where = f"block {i}"
    name = type(blk).__name__
    attn = blk.attn
    if name == "ResidualAttentionBlock" and isinstance(attn, nn.MultiheadAttention):
        if hasattr(blk, "ln_1_kv"):
            raise _unsupported(f"{where} is a cross-attention block")
        if attn.in_proj_weight is not None:  # a view of the model's [q; k; v] weight: no copy per read
            qkv = Linear(_d(attn.in_proj_weight), _d(attn.in_proj_bias))
        else:  # separate q/k/v weights (kdim/vdim set): one fused copy
            q, k, v = _mha_projections(attn)
            qkv = Linear(torch.cat([q.weight, k.weight, v.weight]),
                         None if q.bias is None else torch.cat([q.bias, k.bias, v.bias]))
        heads = attn.num_heads
        out = _linear(attn.out_proj, f"{where} out_proj")
        mid_norm = None
    elif name == "CustomResidualAttentionBlock":
        extras = [
            ("qk_norm", not isinstance(attn.ln_q, nn.Identity)),
            ("scaled cosine attention", attn.logit_scale is not None),
            ("head scaling", attn.head_scale is not None),
            ("inner attention norm", not isinstance(attn.ln_inner, nn.Identity)),
            ("post-attention norm", not isinstance(blk.ln_attn, nn.Identity)),
        ]
        used = [n for n, on in extras if on]
        if used:
            raise _unsupported(f"{where} uses {', '.join(used)}")
        qkv = Linear(_d(attn.in_proj_weight), _d(attn.in_proj_bias))
        heads = attn.num_heads
        out = _linear(attn.out_proj, f"{where} out_proj")
        mid_norm = blk.mlp.ln
    else:
        raise _unsupported(f"{where} is a {name}")
    return Block(
        ln1=_layer_norm(blk.ln_1, f"{where} ln_1") or _identity_ln_error(where),
        qkv=qkv,
        heads=heads,
        out=out,
        gamma1=_scale(blk.ls_1),
        mlp=_mlp_branch(blk.ln_2, blk.mlp.c_fc, blk.mlp.gelu, blk.mlp.c_proj, where,
                        mid_norm=mid_norm, gamma=_scale(blk.ls_2)),
    )


def _identity_ln_error(where: str) -> LayerNorm:
    raise _unsupported(f"{where} has no pre-attention LayerNorm")


def _timm_block(blk: nn.Module, i: int) -> Block:
    where = f"block {i}"
    if type(blk).__name__ != "Block" or type(blk.attn).__name__ != "Attention":
        raise _unsupported(f"{where} is a timm {type(blk).__name__} with {type(blk.attn).__name__}")
    attn = blk.attn
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(getattr(attn, "norm", nn.Identity()),
                                                                    nn.Identity):
        raise _unsupported(f"{where} uses qk_norm or an attention output norm")
    if getattr(attn, "gate", None) is not None:
        raise _unsupported(f"{where} uses gated attention")
    mlp = blk.mlp
    if type(mlp).__name__ != "Mlp":
        raise _unsupported(f"{where} has a {type(mlp).__name__} MLP, expected timm Mlp")
    return Block(
        ln1=_layer_norm(blk.norm1, f"{where} norm1") or _identity_ln_error(where),
        qkv=_linear(attn.qkv, f"{where} qkv"),
        heads=attn.num_heads,
        out=_linear(attn.proj, f"{where} proj"),
        gamma1=_scale(blk.ls1),
        mlp=_mlp_branch(blk.norm2, mlp.fc1, mlp.act, mlp.fc2, where, mid_norm=mlp.norm,
                        gamma=_scale(blk.ls2)),
    )


def _open_clip_vit(visual: nn.Module) -> Tower:
    width = visual.conv1.out_channels
    blocks = tuple(_open_clip_block(b, i) for i, b in enumerate(visual.transformer.resblocks))
    ln_post = _layer_norm(visual.ln_post, "ln_post")
    proj = None if visual.proj is None else Linear(visual.proj.detach().T)
    proj_ops: tuple[Op, ...] = () if proj is None else (proj,)
    post: tuple[Op, ...] = () if ln_post is None else (ln_post,)

    head = pool = None
    if visual.attn_pool is not None:
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            raise _unsupported(f"attn_pool_type {visual.attn_pool_type!r} (parallel/cascade poolers)")
        if visual.pool_type != "tok":
            raise _unsupported(f"attentional pooler with pool_type {visual.pool_type!r}; expected 'tok'")
        ap = visual.attn_pool
        qp, kp, vp = _mha_projections(ap.attn)
        ln_q = _layer_norm(ap.ln_q, "attn_pool.ln_q")
        query = ap.query.detach()
        if ln_q is not None:
            query = ln_q.forward(query)[0]
        query = qp.forward(query)[0]
        ln_k = _layer_norm(ap.ln_k, "attn_pool.ln_k")
        pool = AttnPool(
            pre=() if ln_k is None else (ln_k,),
            key_start=0,
            query=query,
            k=kp,
            v=vp,
            heads=ap.attn.num_heads,
            tail=(_linear(ap.attn.out_proj, "attn_pool out_proj"), *post, SelectToken(0), *proj_ops),
        )
    else:
        if visual.pool_type == "tok":
            select: Op = SelectToken(0)
        elif visual.pool_type == "avg":
            select = MeanTokens(1)
        else:
            raise _unsupported(f"pool_type {visual.pool_type!r}; expected 'tok' or 'avg'")
        if visual.final_ln_after_pool:
            head = (select, *post, *proj_ops)
        else:
            head = (*post, select, *proj_ops)

    conv = visual.conv1
    if conv.padding not in ((0, 0), 0) or tuple(conv.stride) != tuple(conv.kernel_size):
        raise _unsupported("the patch embedding is not a non-overlapping convolution")
    return Tower(
        name="open_clip.VisionTransformer",
        patch_size=tuple(conv.kernel_size),
        native_grid=tuple(visual.grid_size),
        patch_weight=conv.weight.detach(),
        patch_bias=_d(conv.bias),
        patch_norm=None,
        prefix=visual.class_embedding.detach().reshape(1, width),
        pos_embed=visual.positional_embedding.detach(),
        pos_covers_prefix=True,
        pre_norm=_layer_norm(visual.ln_pre, "ln_pre"),
        blocks=blocks,
        head=head,
        pool=pool,
        legrad_head=(MeanTokens(0), *post, *proj_ops),
        has_cls=True,
    )


def _timm_head_ops(module: nn.Module, where: str) -> list[Op]:
    """open_clip TimmModel head / timm classifier: Identity, Linear, Dropout or timm Mlp."""
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return []
    if isinstance(module, nn.Linear):
        return [Linear(_d(module.weight), _d(module.bias))]
    if isinstance(module, nn.Sequential):
        return [op for i, m in enumerate(module) for op in _timm_head_ops(m, f"{where}[{i}]")]
    if type(module).__name__ == "Mlp":
        if not isinstance(module.norm, nn.Identity):
            raise _unsupported(f"{where} MLP has an inner norm")
        return [_linear(module.fc1, f"{where}.fc1"), _activation(module.act, where),
                _linear(module.fc2, f"{where}.fc2")]
    raise _unsupported(f"{where} is a {type(module).__name__}")


def _timm_vit(visual: nn.Module) -> Tower:
    trunk = visual.trunk
    if type(trunk).__name__ != "VisionTransformer" or getattr(trunk, "attn_pool", None) is None \
            or type(trunk.attn_pool).__name__ != "AttentionPoolLatent":
        raise _unsupported(
            f"timm trunk {type(trunk).__name__} with global_pool={getattr(trunk, 'global_pool', None)!r} "
            "has no MAP attention-pool head")
    if trunk.pos_embed is None:
        raise _unsupported("timm trunk has no absolute positional embedding (rotary embeddings)")
    if getattr(trunk, "rope", None) is not None:
        raise _unsupported("timm trunk uses rotary position embeddings")
    blocks = tuple(_timm_block(b, i) for i, b in enumerate(trunk.blocks))
    ap = trunk.attn_pool
    if ap.pos_embed is not None or not isinstance(ap.q_norm, nn.Identity):
        raise _unsupported("the attention pool uses a positional embedding or qk_norm")
    if ap.mlp is None:
        raise _unsupported("the attention pool has no output projection (pre-logits mode)")
    if ap.latent_len != 1 and ap.pool != "token":
        raise _unsupported(f"the attention pool averages {ap.latent_len} latent queries")
    kv_w = _d(ap.kv.weight)
    kv_b = _d(ap.kv.bias)
    latent = ap.latent.detach()[0]
    query = latent if isinstance(ap.q, nn.Identity) else _linear(ap.q, "attn_pool.q").forward(latent)[0]
    dp = kv_w.shape[0] // 2
    tail: list[Op] = [
        _linear(ap.proj, "attn_pool.proj"),
        _mlp_branch(ap.norm, ap.mlp.fc1, ap.mlp.act, ap.mlp.fc2, "attn_pool.mlp", mid_norm=ap.mlp.norm),
        SelectToken(0),
    ]
    fc_norm = _layer_norm(trunk.fc_norm, "fc_norm")
    if fc_norm is not None:
        tail.append(fc_norm)
    tail += _timm_head_ops(trunk.head, "trunk.head")
    tail += _timm_head_ops(visual.head, "head")
    final_norm = _layer_norm(trunk.norm, "trunk.norm")
    P = trunk.num_prefix_tokens
    pool = AttnPool(
        pre=() if final_norm is None else (final_norm,),
        key_start=0 if getattr(trunk, "pool_include_prefix", False) else P,
        query=query,
        k=Linear(kv_w[:dp], None if kv_b is None else kv_b[:dp]),
        v=Linear(kv_w[dp:], None if kv_b is None else kv_b[dp:]),
        heads=ap.num_heads,
        tail=tuple(tail),
    )
    prefix = [t.detach().reshape(-1, t.shape[-1]) for t in (trunk.cls_token, trunk.reg_token) if t is not None]
    pe = trunk.patch_embed
    conv = pe.proj
    if tuple(conv.stride) != tuple(conv.kernel_size):
        raise _unsupported("the patch embedding is not a non-overlapping convolution")
    pos = trunk.pos_embed.detach()[0]
    return Tower(
        name=f"timm.{type(trunk).__name__}",
        patch_size=tuple(conv.kernel_size),
        native_grid=tuple(pe.grid_size),
        patch_weight=conv.weight.detach(),
        patch_bias=_d(conv.bias),
        patch_norm=_layer_norm(pe.norm, "patch_embed.norm"),
        prefix=torch.cat(prefix) if prefix else None,
        pos_embed=pos,
        pos_covers_prefix=not trunk.no_embed_class and P > 0,
        pre_norm=_layer_norm(trunk.norm_pre, "norm_pre"),
        blocks=blocks,
        head=None,
        pool=pool,
        legrad_head=None,
        has_cls=trunk.cls_token is not None,
    )


def read_tower(model: nn.Module) -> Tower:
    """Describe the image tower of an open_clip model (or of a bare tower module)."""
    visual = getattr(model, "visual", model)
    name = type(visual).__name__
    if name == "VisionTransformer" and hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return _open_clip_vit(visual)
    if name == "TimmModel" and hasattr(visual, "trunk"):
        return _timm_vit(visual)
    raise _unsupported(f"the image tower is a {name}")

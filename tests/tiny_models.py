"""Tiny random-init towers for tests, registered like real ones.

open_clip configs live in ``tests/model_configs/*.json``; the two timm trunks they reference are
registered here with timm's own ``register_model``.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

CONFIG_DIR = Path(__file__).parent / "model_configs"


def _vit(args: dict, kwargs: dict) -> VisionTransformer:
    # timm's factory passes bookkeeping kwargs (pretrained_cfg, cache_dir, …) the constructor does not take
    cfg = kwargs.pop("pretrained_cfg", None)
    for key in ("pretrained_cfg_overlay", "cache_dir", "pretrained_strict"):
        kwargs.pop(key, None)
    model = VisionTransformer(**dict(args, **kwargs))
    model.pretrained_cfg = model.default_cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    return model


@register_model
def ovl_test_vit_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """SigLIP-like: no class token, MAP head, tanh GELU."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, class_token=False,
                global_pool="map", act_layer="gelu_tanh", qkv_bias=True)
    return _vit(args, kwargs)


@register_model
def ovl_test_vit_map_prefix(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """MAP head over patches only, with a class token, two registers and LayerScale."""
    args = dict(img_size=(32, 40), patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=True,
                reg_tokens=2, no_embed_class=True, global_pool="map", init_values=0.3, qkv_bias=False)
    return _vit(args, kwargs)


def register() -> None:
    if "ovl-test-vit" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


TRANSFORMER_CONFIGS = [
    "ovl-test-vit",
    "ovl-test-vit-ls-wide",
    "ovl-test-vit-quickgelu",
    "ovl-test-coca",
    "ovl-test-siglip",
    "ovl-test-siglip-prefix",
]

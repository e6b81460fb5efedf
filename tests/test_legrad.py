"""LeGrad engine against an independent autograd implementation of its definition."""

from __future__ import annotations

import copy

import pytest
import torch

import reference
from conftest import make_model
from ovlabel import InputError, UnsupportedModelError, compute_maps, list_methods
from ovlabel.legrad import read_tower, resolve_layers
from tiny_models import TRANSFORMER_CONFIGS

CLS_CONFIGS = ["ovl-test-vit", "ovl-test-vit-ls-wide", "ovl-test-vit-quickgelu"]


def _native_size(model):
    tower = read_tower(model)
    return tuple(g * p for g, p in zip(tower.native_grid, tower.patch_size))


def _embed_dim(model) -> int:
    with torch.no_grad():
        probe = torch.zeros(1, 3, *_native_size(model), dtype=next(model.parameters()).dtype)
        return model.encode_image(probe).shape[-1]


def _inputs(model, size=None, batch=2, queries=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = size or _native_size(model)
    dtype = next(model.parameters()).dtype
    images = torch.randn(batch, 3, *size, generator=g, dtype=torch.float64).to(dtype)
    text = torch.randn(queries, _embed_dim(model), generator=g, dtype=torch.float64).to(dtype)
    return images, text


@pytest.mark.parametrize("name", TRANSFORMER_CONFIGS)
@pytest.mark.parametrize("layers", ["all", -2, [0]])
def test_matches_autograd_reference(name, layers):
    model = make_model(name, dtype=torch.float64)
    images, text = _inputs(model)
    n = len(reference.blocks(model))
    ids = resolve_layers(layers, n)
    ours = compute_maps(model, images, text, layers=layers)
    ref = reference.legrad(model, images, text, ids)
    assert ours.shape == ref.shape == (2, 3, *images.shape[-2:])
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", TRANSFORMER_CONFIGS)
@pytest.mark.parametrize("mode", ["max", "mean"])
def test_background_contrast_matches_autograd_reference(name, mode):
    """The contrastive target t_k·e − agg_b(t_b·e): exact gradients, every tower, several blocks."""
    model = make_model(name, dtype=torch.float64)
    images, text = _inputs(model, batch=3, queries=3)
    bg = torch.randn(4, text.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    n = len(reference.blocks(model))
    ours = compute_maps(model, images, text, layers="all", contrast=bg, contrast_mode=mode)
    ref = reference.legrad(model, images, text, list(range(n)), background=bg, mode=mode)
    assert (ours - ref).abs().max().item() <= 1e-5
    plain = compute_maps(model, images, text, layers="all")
    assert (ours - plain).abs().max().item() > 1e-3  # the target really changed
    chunked = compute_maps(model, images, text, layers="all", contrast=bg, contrast_mode=mode, chunk_size=1)
    assert torch.allclose(chunked, ours, atol=1e-12)
    with pytest.raises(InputError, match="contrast must be a tensor"):
        compute_maps(model, images, text, contrast=bg[:, :3])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", ["ovl-test-vit", "ovl-test-siglip", "ovl-test-siglip-prefix", "ovl-test-coca"])
@pytest.mark.parametrize("size", [(40, 24), (16, 56)])
def test_any_input_size_matches_reference(name, size):
    """Inputs off the native grid: positional embeddings resampled, non-square grids."""
    model = make_model(name, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, text = _inputs(model, size=size, batch=1, queries=2)
    ours = compute_maps(model, images, text, layers="all")
    ref = reference.legrad(model, images, text, list(range(len(reference.blocks(model)))))
    assert ours.shape == (1, 2, *size)
    assert (ours - ref).abs().max().item() <= 1e-5
    after = model.state_dict()
    # bitwise: random init leaves some tensors uninitialised (CoCa's text projection), and NaN != NaN
    changed = [k for k in before if not same_bits(before[k], after[k])]
    assert not changed, {k: (before[k].flatten()[:4], after[k].flatten()[:4]) for k in changed}


@pytest.mark.parametrize("name", TRANSFORMER_CONFIGS)
def test_adapter_embedding_equals_encode_image(name):
    model = make_model(name)
    images, _ = _inputs(model, batch=3)
    tower = read_tower(model)
    with torch.no_grad():
        ours = tower.encode(images)
        theirs = model.encode_image(images, normalize=False)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ovl-test-vit-ls-wide", "ovl-test-siglip"])
def test_query_chunks_give_identical_maps(name):
    model = make_model(name, dtype=torch.float64)
    images, text = _inputs(model, queries=7)
    whole = compute_maps(model, images, text, layers="all")
    for chunk in (1, 3):
        parts = compute_maps(model, images, text, layers="all", chunk_size=chunk)
        assert torch.allclose(whole, parts, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["ovl-test-vit-ls-wide", "ovl-test-vit-quickgelu"])
def test_batched_and_looped_reductions_agree(name):
    model = make_model(name, dtype=torch.float64)
    images, text = _inputs(model, queries=5)
    looped = compute_maps(model, images, text, layers="all", batched=False)
    batched = compute_maps(model, images, text, layers="all", batched=True, chunk_size=2)
    assert torch.allclose(looped, batched, atol=1e-12, rtol=0)


def test_batch_and_single_query_agree_with_separate_calls():
    model = make_model("ovl-test-vit", dtype=torch.float64)
    images, text = _inputs(model, batch=3, queries=4)
    together = compute_maps(model, images, text)
    for b in range(3):
        for k in range(4):
            alone = compute_maps(model, images[b : b + 1], text[k : k + 1])
            assert torch.allclose(together[b, k], alone[0, 0], atol=1e-12)


def test_unnormalised_text_is_normalised():
    model = make_model("ovl-test-vit", dtype=torch.float64)
    images, text = _inputs(model)
    assert torch.allclose(compute_maps(model, images, text), compute_maps(model, images, 7.5 * text), atol=1e-12)


@pytest.mark.parametrize("name", TRANSFORMER_CONFIGS)
def test_model_is_not_mutated(name):
    model = make_model(name)
    images, text = _inputs(model)
    reference_model = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for n, m in model.named_modules()}
    with torch.no_grad():
        emb_before = model.encode_image(images)

    compute_maps(model, images, text, layers="all")
    compute_maps(model, torch.randn(1, 3, 48, 24), text)  # off-native size: pos-embed resampling

    for (n, p), (_, q) in zip(model.state_dict().items(), reference_model.state_dict().items()):
        assert torch.equal(p, q), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()} == hooks
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), emb_before)


@pytest.mark.parametrize("name", TRANSFORMER_CONFIGS)
def test_tower_reads_weights_without_copying_them(name):
    """Reading a tower costs no copy of the weights (a copy per compute_maps call moved 1.6 GB on ViT-bigG-14
    and added it to the peak): every matrix the tower uses shares the model's own storage."""
    model = make_model(name)
    tower = read_tower(model)
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    matrices = [m.weight for blk in tower.blocks for m in (blk.qkv, blk.out, blk.mlp.fc1, blk.mlp.fc2)]
    assert matrices and all(w.untyped_storage().data_ptr() in owned for w in matrices)


def test_output_contract():
    model = make_model("ovl-test-vit-ls-wide")
    images, text = _inputs(model, batch=2, queries=1)
    maps = compute_maps(model, images, text)
    assert maps.shape == (2, 1, 32, 48)
    assert maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    flat = maps.flatten(2)
    assert torch.allclose(flat.max(-1).values, torch.ones(2, 1))
    assert torch.allclose(flat.min(-1).values, torch.zeros(2, 1))


def test_methods_are_listed_and_unknown_rejected():
    assert "legrad" in list_methods()
    model = make_model("ovl-test-vit")
    images, text = _inputs(model)
    with pytest.raises(InputError, match="available methods: .*legrad"):
        compute_maps(model, images, text, method="gradcam++")
    with pytest.raises(InputError, match="does not take option"):
        compute_maps(model, images, text, chunk=4)


def test_unsupported_tower_names_what_is_supported():
    model = make_model("ovl-test-rn")
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet.*VisionTransformer"):
        compute_maps(model, torch.randn(1, 3, 32, 32), torch.randn(1, 24))
    assert isinstance(UnsupportedModelError("x"), ValueError)


@pytest.mark.parametrize(
    "images,text,match",
    [
        (torch.randn(3, 32, 32), torch.randn(2, 24), "shape \\[B,3,H,W\\]"),
        (torch.randn(1, 4, 32, 32), torch.randn(2, 24), "3 channels"),
        (torch.randn(0, 3, 32, 32), torch.randn(2, 24), "empty batch"),
        (torch.randn(1, 3, 30, 32), torch.randn(2, 24), "multiple of the patch size"),
        (torch.randint(0, 255, (1, 3, 32, 32)), torch.randn(2, 24), "floating-point"),
        (torch.full((1, 3, 32, 32), float("nan")), torch.randn(2, 24), "NaN"),
        (torch.randn(1, 3, 32, 32), torch.randn(2, 25), "width 25 .* width 24"),
        (torch.randn(1, 3, 32, 32), torch.randn(0, 24), "K=0"),
        (torch.randn(1, 3, 32, 32), torch.randn(24), "shape \\[K,E\\]"),
        (torch.randn(1, 3, 32, 32), torch.tensor([[float("inf")] * 24]), "NaN or infinite"),
        (torch.randn(1, 3, 32, 32), torch.zeros(2, 24), "all zeros"),
        (torch.randn(1, 3, 32, 32).numpy(), torch.randn(2, 24), "torch.Tensor"),
    ],
)
def test_bad_input_is_a_typed_error(images, text, match):
    model = make_model("ovl-test-vit")
    with pytest.raises(InputError, match=match):
        compute_maps(model, images, text)


@pytest.mark.parametrize(
    "layers,expected",
    [(None, [10, 11]), ("all", list(range(12))), (-3, [9, 10, 11]), ([0, -1, 0], [0, 11]), ("last", [11])],
)
def test_resolve_layers(layers, expected):
    assert resolve_layers(layers, 12) == expected


@pytest.mark.parametrize("layers", [3, 0, -13, [12], [], "first", [1.5], True])
def test_resolve_layers_rejects(layers):
    with pytest.raises(InputError):
        resolve_layers(layers, 12)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-16-SigLIP"])
def test_real_architecture_random_init(name):
    model = make_model(name)
    tower = read_tower(model)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(tower.encode(images), model.encode_image(images), atol=1e-5, rtol=0)
    text = torch.randn(2, _embed_dim(model))
    maps = compute_maps(model, torch.randn(1, 3, 224, 320), text)
    assert maps.shape == (1, 2, 224, 320) and torch.isfinite(maps).all()
    model64 = model.double()
    images64 = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    ours = compute_maps(model64, images64, text.double(), layers=-1)
    ref = reference.legrad(model64, images64, text.double(), [len(reference.blocks(model64)) - 1])
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_vit_l_14_adapter_equals_encode_image():
    model = make_model("ViT-L-14")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(read_tower(model).encode(images), model.encode_image(images), atol=1e-5, rtol=0)
    maps = compute_maps(model, torch.randn(1, 3, 224, 168), torch.randn(3, 768))
    assert maps.shape == (1, 3, 224, 168) and torch.isfinite(maps).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(dtype):
    model = make_model("ViT-B-16").cuda()
    images = torch.randn(2, 3, 224, 224, device="cuda")
    text = torch.randn(5, 512, device="cuda")
    full = compute_maps(model, images, text)
    half = compute_maps(model.to(dtype), images.to(dtype), text.to(dtype))
    assert half.dtype == torch.float32 and half.device.type == "cuda"
    assert torch.isfinite(half).all()
    assert (half - full).abs().mean().item() < 0.02

"""Train the tiny CLIP that ships with ovlabel (``ovlabel-shapes``) on generated shape scenes.

    ovlabel train-demo --out runs/shapes --minutes 30 --seed 0

A small open_clip CLIP (ViT tower: 64×64 input, patch 8 → 8×8 grid, CLS-token pooling; small text tower
with the standard open_clip tokenizer) trained contrastively with the pairwise sigmoid loss of SigLIP:
every image is scored against the prompts of all 36 classes (a random template per class and step),
positives being the classes present in the scene — a multi-label contrastive objective. A pool of
scenes is generated up front (deterministic for the seed). The loss and held-out metrics are logged; the
result is saved as fp16 safetensors + the open_clip model config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common.files import write_json, write_text
from ..datasets.shapes import CLASSES, scene_arrays
from ..models import MANIFEST, SHIPPED_DIR, register_config

log = logging.getLogger(__name__)

MODEL_NAME = "ovlabel-shapes"
MODEL_CONFIG = {
    "embed_dim": 128,
    "init_logit_bias": -5.0,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8,
                   "pool_type": "tok"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# The model's own normalisation (recorded in the config as open_clip's preprocess_cfg).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
TEMPLATES = ("a photo of a {}.", "a {}.", "{}", "a picture of a {}.", "there is a {} in the image.",
             "a {} on a textured background.", "an image with a {}.")
EVAL_TEMPLATE = "a photo of a {}."


def build_model(seed: int):
    import open_clip

    register_config(MODEL_NAME, MODEL_CONFIG)
    torch.manual_seed(seed)
    return open_clip.create_model(MODEL_NAME, pretrained=None)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: np.ndarray, targets: np.ndarray, batch: int = 500) -> float:
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([EVAL_TEMPLATE.format(c) for c in CLASSES])), dim=-1)
    correct = 0
    for i in range(0, len(images), batch):
        e = F.normalize(model.encode_image(to_tensor(images[i : i + batch])), dim=-1)
        correct += int(((e @ text.T).argmax(1).numpy() == targets[i : i + batch]).sum())
    model.train()
    return correct / len(images)


def train(out_dir: str | Path, *, steps: int = 8000, minutes: float | None = None, seed: int = 0, pool: int = 50000,
          batch: int = 128, lr: float = 1e-3, threads: int | None = None) -> dict:
    """Train for ``steps`` (reproducible from the seed) and save the model into ``out_dir``. ``minutes``
    instead stops on wall time (not reproducible; for quick experiments)."""
    import open_clip
    from safetensors.torch import save_file

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, labels, _ = scene_arrays(pool, seed, 64, min_objects=1, max_objects=3, empty_fraction=0.08)
    single, single_labels, _ = scene_arrays(1000, seed + 10_000, 64, min_objects=1, max_objects=1)
    single_targets = single_labels.argmax(1)
    log.info("generated %d training scenes in %.1fs", pool, time.time() - t0)

    model = build_model(seed)
    model.train()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    all_prompts = [[t.format(c) for c in CLASSES] for t in TEMPLATES]
    tokens = torch.stack([tokenizer(p) for p in all_prompts])  # [templates, 36, ctx]
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "logit" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(seed)
    max_steps = None if minutes is not None else steps
    budget = (minutes or 0) * 60
    est_steps = max_steps or 10**9
    warmup = 100
    history = []
    step = 0
    train_start = time.time()
    while True:
        elapsed = time.time() - train_start
        if (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed > budget):
            break
        # cosine schedule over the time budget (or the step budget)
        progress = step / est_steps if max_steps else elapsed / budget
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g in opt.param_groups:
            g["lr"] = lr * max(scale, 0.02)
        idx = rng.integers(0, pool, size=batch)
        x = to_tensor(images[idx])
        y = torch.from_numpy(labels[idx])
        tmpl = rng.integers(0, len(TEMPLATES), size=len(CLASSES))
        text_tokens = tokens[tmpl, np.arange(len(CLASSES))]
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(text_tokens), dim=-1)
        logits = img @ txt.T * model.logit_scale.exp() + model.logit_bias
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % 50 == 0:
            row = {"step": step, "minutes": round((time.time() - train_start) / 60, 2), "loss": round(loss.item(), 4),
                   "lr": opt.param_groups[0]["lr"]}
            if step % 250 == 0:
                row["zero_shot_single"] = round(zero_shot_accuracy(model, tokenizer, single, single_targets), 4)
            history.append(row)
            log.info("%s", row)
    model.eval()
    acc = zero_shot_accuracy(model, tokenizer, single, single_targets)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    weights = out_dir / f"{MODEL_NAME}.safetensors"
    save_file(state, str(weights))
    write_json(out_dir / f"{MODEL_NAME}.json",
               dict(MODEL_CONFIG, preprocess_cfg={"mean": list(MEAN), "std": list(STD), "size": 64}), indent=2)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    summary = {"steps": step, "minutes": round((time.time() - train_start) / 60, 2), "seed": seed, "pool": pool,
               "batch": batch, "lr": lr, "zero_shot_single_object": acc, "sha256": digest,
               "size_bytes": weights.stat().st_size, "history": history}
    write_json(out_dir / "training.json", summary, indent=2)
    log.info("done: %d steps, zero-shot %.3f, sha256 %s", step, acc, digest)
    return summary


def ship(run_dir: str | Path, package_models_dir: str | Path | None = None) -> dict:
    """Copy a trained model into the package (``src/ovlabel/models``) and record it in ``MANIFEST.json``
    (weights file, sha256, preprocessing, how it was trained)."""
    import shutil

    run_dir = Path(run_dir)
    dest = Path(package_models_dir) if package_models_dir else SHIPPED_DIR
    dest.mkdir(parents=True, exist_ok=True)
    summary = json.loads((run_dir / "training.json").read_text())
    shutil.copyfile(run_dir / f"{MODEL_NAME}.safetensors", dest / f"{MODEL_NAME}.safetensors")
    write_text(dest / f"{MODEL_NAME}.json", json.dumps(MODEL_CONFIG, indent=2) + "\n")
    manifest_path = dest / MANIFEST.name
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[MODEL_NAME] = {
        "weights": f"{MODEL_NAME}.safetensors",
        "sha256": hashlib.sha256((dest / f"{MODEL_NAME}.safetensors").read_bytes()).hexdigest(),
        "mean": list(MEAN), "std": list(STD), "image_size": 64, "classes": list(CLASSES),
        "training": {k: v for k, v in summary.items() if k not in ("history", "sha256")},
        "command": f"ovlabel train-demo --out RUN --steps {summary['steps']} --batch {summary['batch']} "
                   f"--pool {summary['pool']} --lr {summary['lr']} --seed {summary['seed']}",
    }
    write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest[MODEL_NAME]

"""Text queries: names, prompt templates, synonyms, background and negative prompts → text embeddings.

Each class embedding is the normalised mean of the normalised embeddings of every (name or synonym) ×
template prompt — the prompt ensemble of CLIP's zero-shot classifier. Background and negative prompts
are embedded the same way; they compete in the presence softmax and are never emitted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common.categories import Categories
from ..errors import ConfigError

SINGLE_TEMPLATE = ("a photo of a {}.",)
EMPTY_PROMPT = "a photo of a"  # the empty-prompt correction's text (explainer.empty_prompt)

log = logging.getLogger(__name__)


def imagenet_templates() -> tuple[str, ...]:
    """open_clip's 80 OpenAI ImageNet templates, as format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def resolve_templates(templates) -> tuple[str, ...]:
    if templates == "single":
        return SINGLE_TEMPLATE
    if templates == "imagenet":
        return imagenet_templates()
    return tuple(templates)


@dataclass(frozen=True)
class QuerySet:
    categories: Categories
    templates: tuple[str, ...]
    synonyms: dict[str, tuple[str, ...]]
    background: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.categories.names

    def prompts(self, name: str) -> list[str]:
        return [t.format(n) for n in (name, *self.synonyms.get(name, ())) for t in self.templates]

    def describe(self) -> dict:
        return {"names": list(self.names), "ids": list(self.categories.ids), "templates": list(self.templates),
                "synonyms": {k: list(v) for k, v in self.synonyms.items()}, "background": list(self.background)}


def build_queries(cfg, categories: Categories | None = None, names: list[str] | None = None) -> QuerySet:
    """From the ``queries`` config section and the run's category source (a COCO ground truth or a
    categories file keep their ids; plain names get 1..K in order)."""
    if categories is None:
        names = list(names or cfg.names)
        if not names:
            raise ConfigError("no queries: pass --queries a b c, --queries-file FILE, --coco-gt GT.json, or set "
                              "queries.names in the config")
        blank = [n for n in names if not str(n).strip()]
        if blank:
            raise ConfigError("a query is empty; every query needs a name")
        categories = Categories.from_names([str(n).strip() for n in names])
    unknown = sorted(set(cfg.synonyms) - set(categories.names))
    if unknown:
        raise ConfigError(f"queries.synonyms has entries for {unknown}, which are not queries "
                          f"({', '.join(categories.names[:10])}…)")
    return QuerySet(categories, resolve_templates(cfg.templates),
                    {k: tuple(v) for k, v in cfg.synonyms.items()},
                    tuple(cfg.background) + tuple(cfg.negatives))


@torch.no_grad()
def prompt_length(tokenizer, text: str) -> int | None:
    """Tokens of ``text`` with its start and end tokens, for open_clip's tokenizers (``None`` when the
    tokenizer is of an unknown kind)."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # CLIP's BPE
        return len(tokenizer.encode(text)) + 2
    hf = getattr(tokenizer, "tokenizer", None)
    if callable(hf):  # Hugging Face tokenizers (SigLIP, …): special tokens included
        clean = getattr(tokenizer, "clean_fn", None)
        return len(hf(clean(text) if callable(clean) else text)["input_ids"])
    return None


def warn_long_prompts(tokenizer, prompts: list[str], context_length: int | None) -> list[tuple[str, int]]:
    """Warn (once per prompt) about prompts longer than the text encoder's context, which the tokenizer
    cuts silently; returns them with their lengths."""
    if not context_length:
        return []
    long = []
    for text in dict.fromkeys(prompts):
        n = prompt_length(tokenizer, text)
        if n is not None and n > context_length:
            long.append((text, n))
            log.warning("the prompt %r is %d tokens long, but the text encoder reads %d: it is cut to its first %d "
                        "tokens (shorten the query or its template)", text, n, context_length, context_length)
    return long


def encode_prompts(model, tokenizer, prompts: list[str], device: torch.device, batch: int = 256) -> torch.Tensor:
    warn_long_prompts(tokenizer, prompts, getattr(tokenizer, "context_length", None))
    out = []
    for i in range(0, len(prompts), batch):
        tokens = tokenizer(prompts[i : i + batch]).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


def embed_queries(encode: Callable[[list[str]], torch.Tensor],
                  qs: QuerySet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class embeddings ``[K,E]`` (ensembles) and background embeddings ``[M,E]`` (or ``None``), float32,
    with ``encode(prompts)`` giving unit embeddings of prompts (a backend's ``encode_text``)."""
    per_class = [qs.prompts(n) for n in qs.names]
    flat = [p for ps in per_class for p in ps]
    emb = encode(flat)
    out, i = [], 0
    for ps in per_class:
        out.append(F.normalize(emb[i : i + len(ps)].mean(0), dim=-1))
        i += len(ps)
    text = torch.stack(out)
    background = None
    if qs.background:
        bg = [[t.format(b) for t in qs.templates] for b in qs.background]
        be = encode([p for ps in bg for p in ps])
        background = torch.stack([F.normalize(be[j * len(qs.templates) : (j + 1) * len(qs.templates)].mean(0), dim=-1)
                                  for j in range(len(bg))])
    return text, background


def encode_queries(model, tokenizer, qs: QuerySet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`embed_queries` with an open_clip model and its tokenizer."""
    return embed_queries(lambda prompts: encode_prompts(model, tokenizer, prompts, device), qs)

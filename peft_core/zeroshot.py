"""CLIP zero-shot classification heads from class names (optional extra ``clip``: open_clip).

The head of class ``c`` is the L2-normalised mean, over prompt templates, of
the L2-normalised text embeddings of ``template.format(name_c)``, computed by
the text tower that matches the image tower (Radford et al., 2021). A linear
head with these rows on the (projected) image features scores classes like
CLIP's cosine similarity up to a positive per-image factor, so its argmax is
CLIP's zero-shot prediction; WiSE-FT uses it as the pre-trained head
(``peft_core.wise.wise_models(zero_shot_head=...)``).

Only local files: the model is built from open_clip's bundled architecture
config (``pretrained=None``) and its weights loaded from ``checkpoint``; the
tokenizer must be one shipped with the package (the BPE vocabulary of the
OpenAI-style models), never one fetched from a hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import InputError

TEMPLATES = ("a photo of a {}.",)


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise InputError("zero-shot heads need open_clip: pip install -e '.[clip]'") from None
    return open_clip


def load_clip(model_name: str, checkpoint: str | Path) -> tuple[torch.nn.Module, Any]:
    """An open_clip model from its bundled config and a local checkpoint, with its shipped tokenizer."""
    open_clip = _open_clip()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: CLIP checkpoint not found (nothing is downloaded)")
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise InputError(f"{model_name}: not an open_clip architecture (see open_clip.list_models())")
    if cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        raise InputError(f"{model_name}: its tokenizer comes from the Hugging Face hub; only shipped tokenizers are used")
    model = open_clip.create_model(model_name, pretrained=None)
    open_clip.load_checkpoint(model, str(checkpoint))
    return model.eval(), open_clip.get_tokenizer(model_name)


@torch.no_grad()
def text_head(
    model: torch.nn.Module, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES
) -> torch.Tensor:
    """``(num_classes, embed_dim)``: per class, the normalised mean of its prompts' normalised text embeddings."""
    if not class_names:
        raise InputError("class names: none given")
    if not templates or any("{}" not in t for t in templates):
        raise InputError(f"templates: each must contain '{{}}' (got {list(templates)})")
    rows = []
    for name in class_names:
        emb = model.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (blank lines ignored), in label order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: class-name file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise InputError(f"{path}: no class names")
    return names

"""timm Vision Transformers with weights from a local checkpoint file only.

Supported files: ``.safetensors``, ``.pth``/``.pt``/``.bin`` (loaded with
``weights_only=True``; a ``model``/``state_dict`` wrapper is unwrapped) and the
original Google ``.npz`` (ViT-B/16 ImageNet-21k). Foreign key layouts go
through timm's own ``checkpoint_filter_fn``. A file that does not fit the
architecture fails with the missing / unexpected keys listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

HEAD_KEYS = ("head.weight", "head.bias", "head.fc.weight", "head.fc.bias")


def create(model_name: str, num_classes: int, drop_path: float = 0.0, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm model; never downloads (pretrained=False)."""
    import timm

    if not timm.is_model(model_name):
        raise InputError(f"backbone.model: {model_name!r} is not a timm model name")
    try:
        return timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path, **kwargs
        )
    except TypeError as err:
        raise InputError(f"backbone.kwargs: {err}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "module"):
                if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
            if not isinstance(obj, dict):
                raise InputError(f"{path}: not a state dict ({type(obj).__name__})")
            return obj
    except InputError:
        raise
    except Exception as err:  # corrupt file, wrong format
        raise InputError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    raise InputError(f"{path}: unknown checkpoint format {suffix!r} (.safetensors, .pth, .pt, .bin, .npz)")


def load_backbone(model: nn.Module, path: str | Path) -> None:
    """Load backbone weights into ``model``; the (new) head is left as initialised."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        _load_npz(model, path)
        return
    state = read_state_dict(path)
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in HEAD_KEYS]
    if missing or result.unexpected_keys:
        raise InputError(
            f"{path}: does not match {type(model).__name__} "
            f"(missing {len(missing)}: {missing[:5]}; unexpected {len(result.unexpected_keys)}: "
            f"{result.unexpected_keys[:5]})"
        )


def _load_npz(model: nn.Module, path: Path) -> None:
    import numpy as np
    from timm.models.vision_transformer import _load_weights

    head = {k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()}
    try:
        keys = set(np.load(path).files)
        _load_weights(model, str(path))
    except Exception as err:
        raise InputError(f"{path}: cannot load .npz into {type(model).__name__} ({err})") from None
    if "Transformer/encoder_norm/scale" not in keys:
        raise InputError(f"{path}: not a ViT .npz checkpoint (no Transformer/encoder_norm)")
    model.get_classifier().load_state_dict(head)


def build(
    model_name: str,
    checkpoint: str | Path | None,
    num_classes: int,
    drop_path: float = 0.0,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    model = create(model_name, num_classes, drop_path, **(kwargs or {}))
    if checkpoint is not None:
        load_backbone(model, checkpoint)
    return model

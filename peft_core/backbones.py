"""timm Vision Transformers with weights from a local checkpoint file only.

Supported files: ``.safetensors``, ``.pth``/``.pt``/``.bin``/``.ckpt``
(loaded with ``weights_only=True``; a ``model``/``state_dict``/``module``
wrapper is unwrapped) and the original Google ``.npz`` layout (e.g.
``ViT-B_16.npz``, ImageNet-21k), read by timm's own ``_load_weights``.
Foreign key layouts (original DINOv2, OpenAI CLIP, OpenCLIP) go through timm's
``checkpoint_filter_fn``. A file that does not fit the architecture fails
with one line listing a few missing / unexpected / wrongly shaped keys; the
(new) classification head is never loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

HEAD_KEYS = ("head.weight", "head.bias", "head.fc.weight", "head.fc.bias")
# npz entries that are not part of the backbone (classifier, old representation layer)
NPZ_IGNORED = ("head/", "pre_logits/")
# npz entries timm resamples to the model's patch size / grid: only the trailing dims
# (channels in/out; width) must match
NPZ_RESAMPLED = {"embedding/kernel": slice(2, None), "Transformer/posembed_input/pos_embedding": slice(2, None)}
SHOWN = 5  # keys listed per kind in a mismatch message


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
    """The tensors of a ``.safetensors`` / torch checkpoint, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        raise InputError(f"{path}: unknown checkpoint format {suffix!r} (.safetensors, .pth, .pt, .bin, .ckpt, .npz)")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  corrupt file, wrong format, a pickle that is more than tensors
        raise InputError(f"{path}: cannot read checkpoint ({type(err).__name__}: {_one_line(err)})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise InputError(f"{path}: not a state dict of tensors ({type(obj).__name__})")
    return tensors


def load_backbone(model: nn.Module, path: str | Path) -> None:
    """Load backbone weights into ``model``; the (new) head is left as initialised."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise InputError(f"{path}: checkpoint file not found")
        _load_npz(model, path)
        return
    state = read_state_dict(path)
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        try:
            state = checkpoint_filter_fn(state, model)
        except Exception as err:  # noqa: BLE001  a converter choking on a foreign layout
            raise InputError(f"{path}: cannot convert for {type(model).__name__} ({_one_line(err)})") from None
    state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in HEAD_KEYS}
    _raise_on_mismatch(path, model, expected, {k: v.shape for k, v in state.items()})
    model.load_state_dict(state, strict=False)


def _raise_on_mismatch(
    path: Path,
    model: nn.Module,
    expected: dict[str, Any],
    found: dict[str, Any],
    resampled: dict[str, slice] | None = None,
) -> None:
    """One-line InputError if keys are missing, unexpected or of another shape.

    ``resampled`` names keys of which only a part of the shape must match
    (the loader resizes the rest).
    """
    part = resampled or {}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k])} != {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k])[part.get(k, slice(None))] != tuple(expected[k])[part.get(k, slice(None))]
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"{label} {len(keys)}: {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if keys
    ]
    raise InputError(f"{path}: does not fit {type(model).__name__} ({'; '.join(parts)})")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# --- the original Google ViT .npz layout -------------------------------------------------------

NpzRule = tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]


def npz_rules(model: nn.Module) -> list[NpzRule]:
    """``(npz key, model key, model tensor -> npz array)`` for every backbone tensor.

    The inverse of timm's ``_load_weights`` for the original (non big_vision)
    layout. It defines which npz entries a model needs (and their shapes), and
    exports a timm ViT into that layout (:func:`to_npz_layout`); the tests
    check that timm's loader reads the export back to identical logits.
    """
    rules: list[NpzRule] = [
        ("embedding/kernel", "patch_embed.proj.weight", lambda t: t.permute(2, 3, 1, 0)),  # OIHW -> HWIO
        ("embedding/bias", "patch_embed.proj.bias", _same),
        ("Transformer/encoder_norm/scale", "norm.weight", _same),
        ("Transformer/encoder_norm/bias", "norm.bias", _same),
    ]
    if getattr(model, "cls_token", None) is not None:
        rules.append(("cls", "cls_token", _same))
    if getattr(model, "pos_embed", None) is not None:
        rules.append(("Transformer/posembed_input/pos_embedding", "pos_embed", _same))
    for i, block in enumerate(model.blocks):
        rules += _npz_block_rules(i, block.attn.num_heads)
    return rules


def _npz_block_rules(i: int, heads: int) -> list[NpzRule]:
    """One encoder block: Flax keeps q/k/v as separate ``[D, heads, head_dim]`` kernels."""
    b, m = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    att = b + "MultiHeadDotProductAttention_1/"
    rules: list[NpzRule] = []
    for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
        rules += [(f"{b}{ln}/scale", f"{m}{norm}.weight", _same), (f"{b}{ln}/bias", f"{m}{norm}.bias", _same)]
    for j, name in enumerate(("query", "key", "value")):
        rules.append((f"{att}{name}/kernel", f"{m}attn.qkv.weight", _qkv_kernel(j, heads)))
        rules.append((f"{att}{name}/bias", f"{m}attn.qkv.bias", _qkv_bias(j, heads)))
    rules.append((f"{att}out/kernel", f"{m}attn.proj.weight", _out_kernel(heads)))
    rules.append((f"{att}out/bias", f"{m}attn.proj.bias", _same))
    for r in range(2):
        rules.append((f"{b}MlpBlock_3/Dense_{r}/kernel", f"{m}mlp.fc{r + 1}.weight", lambda t: t.T))
        rules.append((f"{b}MlpBlock_3/Dense_{r}/bias", f"{m}mlp.fc{r + 1}.bias", _same))
    return rules


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _qkv_kernel(j: int, heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.chunk(3)[j].T.reshape(t.shape[1], heads, -1)


def _qkv_bias(j: int, heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.chunk(3)[j].reshape(heads, -1)


def _out_kernel(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.reshape(t.shape[0], heads, -1).permute(1, 2, 0)  # [D, D] -> [heads, head_dim, D]


def to_npz_layout(model: nn.Module) -> dict[str, Any]:
    """The model's backbone as float32 numpy arrays under the original Google npz keys."""
    state = model.state_dict()
    return {k: fn(state[src]).detach().float().contiguous().numpy() for k, src, fn in npz_rules(model) if src in state}


def _load_npz(model: nn.Module, path: Path) -> None:
    """Check the npz against :func:`npz_rules`, then let timm's ``_load_weights`` read it.

    timm's loader silently ignores extra blocks and leaves model tensors it
    does not know (register tokens, layer scale, CLIP's pre-norm) random, so
    both are checked here first.
    """
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    if not isinstance(model, VisionTransformer):
        raise InputError(f"{path}: .npz checkpoints load only into timm VisionTransformer models")
    rules = npz_rules(model)
    covered = {src for _, src, _ in rules}
    uncovered = [k for k in model.state_dict() if k not in covered and k not in HEAD_KEYS]
    if uncovered:
        raise InputError(
            f"{path}: the Google .npz layout has no weights for {type(model).__name__} tensors "
            f"{', '.join(uncovered[:SHOWN])} (a plain ViT is needed)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: npz[k].shape for k in npz.files if not k.startswith(NPZ_IGNORED)}
    except Exception as err:  # noqa: BLE001  not a zip, bad member, pickled arrays
        raise InputError(f"{path}: cannot read .npz ({type(err).__name__}: {_one_line(err)})") from None
    state = model.state_dict()
    expected = {key: tuple(fn(state[src]).shape) for key, src, fn in rules if src in state}
    _raise_on_mismatch(path, model, expected, found, resampled=NPZ_RESAMPLED)
    head = {k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()}
    try:
        _load_weights(model, str(path))
    except Exception as err:  # noqa: BLE001  whatever timm's loader raises
        raise InputError(f"{path}: cannot load .npz into {type(model).__name__} ({_one_line(err)})") from None
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

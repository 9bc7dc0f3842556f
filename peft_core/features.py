"""Cached frozen features: the linear probe trains its head on them, not on images.

A head-only method (``linear``: every trainable tensor is in the classification
head) runs the frozen backbone on the same images in every epoch of every
cell. When nothing stochastic sits in front of the head (no augmentation in the
protocol, ``drop_path`` 0, no dropout, no BatchNorm in the backbone), the head's
input is a fixed function of the image, so it is computed once per
(data set, split, backbone, image size, precision): rule ``extract_features``,
one file per split, ``results/<study>/features/<dataset>/<split>_<key>.safetensors``.
The cell then trains exactly what it trained before, on those tensors: the same
model (built the same way, so the head starts from the same draws), the same
optimiser over the same parameters, the same data order (the generator's
draws), learning rates, epochs and evaluation batches; only the backbone's
forward pass is gone. On CPU in fp32 the result is the same to the last bit
(tests/unit/test_feature_cache.py compares head weights and logits).

Identity. The file name's key hashes what is known when the study is planned
(:class:`FeatureSpec`: data set, split, image size, normalisation, resize
filter, backbone spec, precision); its metadata holds the *content* key, a
sha256 of that spec, the split cache's content fingerprint (pixels and labels),
the checkpoint's sha256 and the feature code's checksum (:data:`CODE`). A cell
uses the file only if that content key is the one of the inputs it was given
(else a one-line error naming the file), and records the file's sha256 in
``metrics.json`` (``inputs.features``): a recomputation with new bytes retrains
the cells that read it, an identical one reuses them (peft_core/fingerprint.py).

``train.feature_cache: false`` turns it off (the cells then read the images,
with the same result).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cells import BackboneSpec, CellSpec, cell_hash
from .sections import Strict
from .errors import InputError, require_files

_META = "features"
#: images per forward pass while extracting, per device type (the rows do not depend on it: see
#: the tests); on a CPU small batches run faster (ViT-Ti/16 at 224 px: 38 img/s at 32, 23 at 128)
BATCH = {"cpu": 32, "cuda": 256}
#: the code the features depend on; its checksum is part of the content key
CODE = ("features.py", "backbones.py", "data.py")
#: timm ``create_model`` arguments that make the forward pass stochastic in train mode
_STOCHASTIC_KWARGS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                      "drop_path_rate", "drop_block_rate")  # fmt: skip


class FeatureSpec(Strict):
    """What the features of one split depend on, known when the study is planned; its hash names the file."""

    dataset: str
    split: str
    image_size: int
    normalize: str
    interpolation: str
    backbone: BackboneSpec
    precision: str

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        return cell_hash(self.model_dump(mode="json"))


def feature_spec(spec: CellSpec, split: str) -> FeatureSpec:
    """The features a cell reads for ``split`` (its training or its evaluation split)."""
    return FeatureSpec(
        dataset=spec.dataset, split=split, image_size=spec.image_size, normalize=spec.normalize,
        interpolation=spec.interpolation, backbone=spec.backbone, precision=spec.precision,
    )  # fmt: skip


def plan_reason(spec: CellSpec, enabled: bool = True) -> str | None:
    """Why a cell can not train on cached features (None: it can), from its spec alone."""
    from .methods import get_method

    if not enabled:
        return "train.feature_cache is false"
    if not get_method(spec.method).head_only:
        return f"method {spec.method!r} trains more than the head"
    if spec.drop_path > 0:
        return f"drop_path {spec.drop_path}: the frozen features are stochastic in training"
    if spec.pace is not None:
        return "train.pace is set"
    bad = [k for k in _STOCHASTIC_KWARGS if (spec.backbone.kwargs.get(k) or 0) > 0]
    if bad:
        return f"backbone.kwargs.{bad[0]} > 0: the frozen features are stochastic in training"
    return None


def model_reason(model: nn.Module) -> str | None:
    """Why this built model can not train on cached features: a trainable tensor, a
    dropout or a BatchNorm outside the head (None: the head's input is a fixed function of the image)."""
    from .methods._common import classifier

    head = classifier(model)
    inside = {id(m) for m in head.modules()}
    names = {id(p) for p in head.parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in names]
    if trainable:
        return f"{trainable[0]} trains outside the head"
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name} is a dropout (p={m.p})"
        if type(m).__name__ == "DropPath" and getattr(m, "drop_prob", 0) > 0:
            return f"{name} is a drop-path (p={m.drop_prob})"
        if isinstance(m, nn.modules.batchnorm._NormBase):
            return f"{name} is a BatchNorm (batch statistics in training)"
    return None


def code_checksum() -> str:
    """sha256 of the feature path's source files (:data:`CODE`), in order."""
    h = hashlib.sha256()
    for name in CODE:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes() + b"\0")
    return h.hexdigest()


def content_key(fspec: FeatureSpec, data_sha256: str, checkpoint_sha256: str | None, code: str) -> str:
    """The key of the features' *content*: spec, split content, checkpoint bytes and code."""
    record = {"spec": fspec.model_dump(mode="json"), "data": data_sha256, "checkpoint": checkpoint_sha256, "code": code}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def expected_key(fspec: FeatureSpec, data: str | Path, checkpoint: str | Path | None, memo_dir=None) -> str:
    """The content key features of ``data`` (a split cache) must carry, from the current files."""
    from .data import cache_fingerprint
    from .fingerprint import fingerprint

    ckpt = fingerprint(checkpoint, memo_dir) if checkpoint is not None else None
    return content_key(fspec, cache_fingerprint(data), ckpt, code_checksum())


class CachedHead(nn.Module):
    """The model's head fed a cached batch laid out in memory as the backbone hands it over.

    timm's ViT gives its head ``x[:, 0]``, a view with a row stride of tokens x width;
    kernels such as BatchNorm's reduce in another order on a contiguous copy, so the
    cached rows are copied into a view of the same strides first (``layout``: row
    stride and storage offset of the head's input; None where it was contiguous),
    in the dtype the head got (``dtype``: bf16 under autocast where the backbone's last
    op gives bf16; the file stores float32, which holds a bf16 value exactly).
    """

    def __init__(self, head: nn.Module, layout: tuple[int, int] | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.head, self.layout, self.dtype = head, layout, dtype

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.to(self.dtype)
        if self.layout is not None:
            stride, offset = self.layout
            rows, width = f.shape
            buffer = f.new_empty(offset + max(rows - 1, 0) * stride + width)
            f = buffer.as_strided((rows, width), (stride, 1), offset).copy_(f)
        return self.head(f)


def _layout(t: torch.Tensor) -> dict[str, Any]:
    """How the head's input lies in memory (:class:`CachedHead`): strides, offset, dtype."""
    strided = t.dim() == 2 and not t.is_contiguous() and t.stride(1) == 1
    layout = [t.stride(0), t.storage_offset()] if strided else None
    return {"layout": layout, "dtype": str(t.dtype).removeprefix("torch.")}


@torch.inference_mode()
def head_inputs(model: nn.Module, images: torch.Tensor, normalize: str, precision: str) -> tuple[torch.Tensor, dict]:
    """The classification head's input for every image (eval mode), as float32 on the CPU,
    and its memory layout (:class:`CachedHead`)."""
    from .data import to_float
    from .methods._common import classifier
    from .train import autocast_dtype

    model.eval()
    seen: list[torch.Tensor] = []
    handle = classifier(model).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    dtype = autocast_dtype(precision)
    batch = BATCH.get(images.device.type, 256)
    try:
        for start in range(0, images.shape[0], batch):
            with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
                model(to_float(images[start : start + batch], normalize))
    finally:
        handle.remove()
    if not seen:
        return torch.zeros(0, 0), {"layout": None, "dtype": "float32"}
    return torch.cat([t.float().cpu() for t in seen]), _layout(seen[0])


def extract(
    fspec: FeatureSpec,
    data: str | Path,
    checkpoint: str | Path | None,
    out: str | Path,
    threads: int = 1,
    device: str = "auto",
    log=None,
) -> dict[str, Any]:
    """Compute the features of one split cache and write them to ``out`` (deterministic bytes)."""
    import time

    from . import backbones
    from .data import load_split
    from .results import write_safetensors
    from .train import pick_device

    log = log or (lambda msg: print(msg, flush=True))
    require_files(data, checkpoint)
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    dev = pick_device(device)
    key = expected_key(fspec, data, checkpoint)
    split = load_split(data, dev)
    b = fspec.backbone
    model = backbones.build(b.model, checkpoint, 1, 0.0, b.kwargs).to(dev)
    feats, layout = head_inputs(model, split.images, fspec.normalize, fspec.precision)
    meta = {"spec": fspec.canonical_json(), "content_key": key, **layout}
    write_safetensors(out, {"features": feats.contiguous(), "labels": split.labels.cpu().contiguous()},
                      metadata={_META: json.dumps(meta, sort_keys=True)})  # fmt: skip
    seconds = time.perf_counter() - t0
    log(f"{fspec.dataset}/{fspec.split} features {tuple(feats.shape)} -> {out} ({seconds:.1f} s)")
    return {"shape": list(feats.shape), "content_key": key, "seconds": seconds}


def read_features(path: str | Path) -> tuple[FeatureSpec, dict, torch.Tensor, torch.Tensor]:
    """(spec, metadata, features, labels) of a feature file; a one-line error if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: feature cache not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META])
            feats, labels = f.get_tensor("features"), f.get_tensor("labels")
        fspec = FeatureSpec.model_validate_json(meta["spec"])
        if feats.dim() != 2 or labels.shape != (feats.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(f"features {tuple(feats.shape)}, labels {tuple(labels.shape)} {labels.dtype}")
        layout, dtype = meta["layout"], getattr(torch, meta["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {meta['dtype']!r}")
        layout = (int(layout[0]), int(layout[1])) if layout else None
        meta = {"content_key": str(meta["content_key"]), "layout": layout, "dtype": dtype}
        return fspec, meta, feats, labels
    except Exception as err:  # corrupt or truncated file, not safetensors, no or bad metadata
        text = " ".join(str(err).split())[:200]
        raise InputError(f"{path}: not a feature cache ({type(err).__name__}: {text})") from None


def load_for_cell(path: str | Path, fspec: FeatureSpec, key: str, device) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """The features, labels and (layout, dtype) at ``path``, checked to be those of ``fspec`` with content ``key``."""
    got, meta, feats, labels = read_features(path)
    if got != fspec:
        raise InputError(f"{path}: features of {got.dataset}/{got.split} ({got.key}), not of {fspec.dataset}/"
                         f"{fspec.split} ({fspec.key})")  # fmt: skip
    if meta["content_key"] != key:
        raise InputError(f"{path}: stale feature cache (made from other data, checkpoint or code); "
                         "rerun its extract_features job")  # fmt: skip
    return feats.to(device), labels.to(device), (meta["layout"], meta["dtype"])


def record(train: str | Path, eval_: str | Path) -> dict[str, dict[str, str]]:
    """``inputs.features`` of a cell's metrics.json: the path and sha256 of each feature file."""
    from .fingerprint import sha256_file

    return {role: {"path": os.fspath(p), "sha256": sha256_file(p)} for role, p in (("train", train), ("eval", eval_))}


def cell_splits(spec: CellSpec, model: nn.Module, features, train_data, eval_data, checkpoint, inputs, device, log):
    """(train, eval, head) for a cell given feature files: the cached head inputs and the head,
    or, where ``model`` needs the images (:func:`model_reason`), the image splits and None."""
    from .data import Split, load_split
    from .methods._common import classifier

    why = model_reason(model)
    if why is not None:
        log(f"feature cache not used: {why}")
        return load_split(train_data, device), load_split(eval_data, device), None
    splits, layouts = [], []
    for split, data, path, role in ((spec.train_split, train_data, features[0], "train"),
                                    (spec.eval_split, eval_data, features[1], "eval")):  # fmt: skip
        fspec = feature_spec(spec, split)
        if inputs is not None:  # the fingerprints the job already took (the checkpoint's is memoised)
            key = content_key(fspec, inputs[role]["sha256"], inputs["checkpoint"]["sha256"], code_checksum())
        else:
            key = expected_key(fspec, data, checkpoint)
        feats, labels, layout = load_for_cell(path, fspec, key, device)
        splits.append(Split(feats, labels))
        layouts.append(layout)
    if layouts[0] != layouts[1]:
        raise InputError(f"{features[1]}: head input layout {layouts[1]}, but {layouts[0]} in {features[0]}")
    log(f"training the head on cached features {features[0]} ({tuple(splits[0].images.shape)}), {features[1]}")
    return splits[0], splits[1], CachedHead(classifier(model), *layouts[0])

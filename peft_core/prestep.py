"""Data-dependent steps before training (SCT's salient channels, GPS's selection, NOAH's search).

A method with a :class:`~peft_core.methods.Prestep` chooses something from
the task's data before its cells train. That choice is its own workflow
stage (rule ``run_prestep``): one result per (data set, split, backbone,
the hyper-parameters it depends on), content-addressed by a
:class:`PrestepSpec` whose hash names the file, computed only from the
training split (``reads="train"``) or from the tuning splits
(``reads="train+val"``: a search selected on validation, never on test).

A cell that uses a result records its sha256 in ``metrics.json``
(``inputs.prestep``) and keeps a copy (``prestep.safetensors``) so the
trained model can be rebuilt exactly; a result with new contents (new data,
a new checkpoint, edited method code) retrains the cells that read it, an
identical recomputation reuses them (peft_core/fingerprint.py).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import backbones
from .cells import BackboneSpec, CellSpec, cell_hash
from .sections import Strict
from .errors import InputError, require_files
from .methods import get_method
from .methods._common import count_trainable
from .methods._prestep_data import PrestepData
from .results import write_json, write_safetensors

#: the copy of the prestep result a cell trained with, kept in the cell directory
PRESTEP = "prestep.safetensors"
_META = "prestep"


class PrestepSpec(Strict):
    """Everything a prestep result depends on; its hash names the file."""

    method: str
    #: only the hyper-parameters the step depends on (``Prestep.key``)
    hparams: dict[str, Any]
    dataset: str
    num_classes: int
    train_split: str
    #: the validation split a search is selected on (``reads="train+val"``), else None
    eval_split: str | None
    image_size: int
    normalize: str
    interpolation: str
    backbone: BackboneSpec
    batch_size: int
    seed: int

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        return cell_hash(self.model_dump(mode="json"))


def prestep_spec(spec: CellSpec, tune_train: str, tune_eval: str, seed: int) -> PrestepSpec | None:
    """The prestep a cell needs (None for a method without one).

    ``reads="train"``: the cell's own training split (a final run on
    train800val200 gets its own result); ``"train+val"``: always the tuning
    splits, so the final runs reuse the searched configuration unchanged.
    ``seed``: the study's tuning seed (the step's randomness is not per final seed).
    """
    method = get_method(spec.method)
    if method.prestep is None:
        return None
    hp = method.hparams(**spec.hparams)
    both = method.prestep.reads == "train+val"
    return PrestepSpec(
        method=spec.method,
        hparams=method.prestep.key(hp),
        dataset=spec.dataset,
        num_classes=spec.num_classes,
        train_split=tune_train if both else spec.train_split,
        eval_split=tune_eval if both else None,
        image_size=spec.image_size,
        normalize=spec.normalize,
        interpolation=spec.interpolation,
        backbone=spec.backbone,
        batch_size=spec.batch_size,
        seed=seed,
    )


def fits(pspec: PrestepSpec, spec: CellSpec) -> bool:
    """Whether a prestep result was made for this cell (same task, backbone, inputs and key)."""
    method = get_method(spec.method)
    if method.prestep is None or pspec.method != spec.method:
        return False
    same = all(
        getattr(pspec, f) == getattr(spec, f)
        for f in ("dataset", "num_classes", "image_size", "normalize", "interpolation", "backbone")
    )
    split_ok = pspec.eval_split is not None or pspec.train_split == spec.train_split
    return same and split_ok and pspec.hparams == method.prestep.key(method.hparams(**spec.hparams))


def read_prestep(path: str | Path) -> tuple[PrestepSpec, dict[str, torch.Tensor]]:
    """A prestep result and the spec it was made for; a one-line error if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prestep result not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return PrestepSpec.model_validate_json(meta[_META]), tensors
    except Exception as err:  # corrupt file, not safetensors, no or bad metadata
        raise InputError(f"{path}: not a prestep result ({type(err).__name__}: {err})") from None


def pick_prestep(paths: list[str | Path], spec: CellSpec) -> Path:
    """The one result among ``paths`` made for ``spec`` (a final run gets all of its method's)."""
    found = [Path(p) for p in paths if fits(read_prestep(p)[0], spec)]
    if not found:
        raise InputError(
            f"{spec.dataset}/{spec.method}/{spec.cell_id}: none of the prestep results given ({len(paths)}) "
            f"was made for this cell's data set, split, backbone and {spec.method} settings"
        )
    return found[0]


def load_for_cell(path: str | Path, spec: CellSpec) -> dict[str, torch.Tensor]:
    pspec, tensors = read_prestep(path)
    if not fits(pspec, spec):
        raise InputError(f"{path}: prestep result of {pspec.dataset}/{pspec.method} {pspec.hparams}, not of this cell")
    return tensors


def state_for_cell(spec: CellSpec, prestep: str | Path | None) -> dict | None:
    """The prestep result a cell's method needs, checked against the cell (before any compute)."""
    has = get_method(spec.method).prestep is not None
    if has and prestep is None:
        raise InputError(f"method {spec.method!r} chooses from the data first: give its prestep result (--prestep)")
    if not has and prestep is not None:
        raise InputError(f"--prestep {prestep}: method {spec.method!r} has no prestep")
    if prestep is None:
        return None
    return load_for_cell(prestep, spec)


def keep_in_cell(path: str | Path, out_dir: str | Path) -> None:
    """Copy the result into the cell directory (how the trained model is rebuilt later)."""
    out = Path(out_dir) / PRESTEP
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(out)


def run_prestep(
    pspec: PrestepSpec,
    train_data: str | Path,
    eval_data: str | Path | None,
    checkpoint: str | Path | None,
    out: str | Path,
    threads: int = 1,
    device: str = "auto",
    log=None,
) -> dict[str, Any]:
    """Compute a prestep result; write ``out`` (.safetensors) and its ``.json`` summary beside it."""
    from .data import cache_fingerprint, load_split, to_float
    from .fingerprint import fingerprint
    from .train import pick_device

    log = log or (lambda msg: print(msg, flush=True))
    method = get_method(pspec.method)
    if method.prestep is None:
        raise InputError(f"method {pspec.method!r} has no prestep")
    both = method.prestep.reads == "train+val"
    if both and eval_data is None:
        raise InputError(f"{pspec.method}: its prestep selects on validation data; give --eval-data")
    require_files(train_data, checkpoint, *([eval_data] if both else []))
    hp = method.hparams(**pspec.hparams)
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(pspec.seed)
    dev = pick_device(device)
    train = load_split(train_data, dev)
    val = load_split(eval_data, dev) if both else None
    b = pspec.backbone
    model = backbones.build(b.model, checkpoint, pspec.num_classes, 0.0, b.kwargs).to(dev).eval()
    data = PrestepData(
        images=train.images,
        labels=train.labels,
        prepare=lambda u: to_float(u, pspec.normalize),
        batch_size=pspec.batch_size,
        seed=pspec.seed,
        log=log,
        val_images=val.images if val is not None else None,
        val_labels=val.labels if val is not None else None,
    )
    try:
        state = method.prestep.compute(model, hp, data)
    except (ValueError, TypeError) as err:
        raise InputError(f"methods.{pspec.method}: {err}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # the count of the configuration actually chosen (NOAH's depends on the data)
    shaped = method.build(backbones.create(b.model, pspec.num_classes, 0.0, **b.kwargs), hp, state)
    inputs = {"train": {"split": pspec.train_split, "sha256": cache_fingerprint(train_data)}}
    if both:
        inputs["eval"] = {"split": pspec.eval_split, "sha256": cache_fingerprint(eval_data)}
    inputs["checkpoint"] = {"sha256": fingerprint(checkpoint) if checkpoint is not None else None}
    summary = {
        "key": pspec.key,
        "spec": pspec.model_dump(mode="json"),
        "trainable_params": count_trainable(shaped),
        "inputs": inputs,
        "seconds": time.perf_counter() - t0,
        "device": str(dev),
    }
    out = Path(out)
    # the spec only (no timings): an identical recomputation gives identical bytes, and reuses the cells
    write_safetensors(out, state, metadata={_META: pspec.canonical_json()})
    write_json(out.with_suffix(".json"), summary)
    log(f"{pspec.dataset}/{pspec.method} prestep {pspec.key}: {summary['trainable_params']:,} trainable "
        f"(head excluded), {summary['seconds']:.1f} s")  # fmt: skip
    return summary

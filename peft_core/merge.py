"""Fold a trained cell into a plain timm checkpoint (``peft-core merge``).

The cell is rebuilt from its ``spec.json`` and the backbone checkpoint, its
trained tensors are loaded, the method's ``merge`` folds them into the
backbone, and the result must load strictly into a freshly created timm model
of the same architecture (no package code needed to use it). Before writing,
merged and unmerged logits are compared on a fixed random probe batch (fp32,
seed 0): if they differ by more than ``MERGE_RTOL`` times the logits' scale
(``max |logit|``, at least 1), the merge is refused and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import backbones
from .cells import CellSpec
from .errors import InputError
from .methods import get_method
from .results import SPEC, WEIGHTS, read_json, write_safetensors
from .prestep import PRESTEP, state_for_cell
from .train import build_model

# Merged and unmerged fp32 logits may differ by rounding only: folding a delta
# into a weight reorders a few sums, ~1e-7 relative per layer (a 12-block ViT
# lands near 1e-6). A wrong merge (a missing scale, a transposed delta) is off
# by the size of the adaptation, orders of magnitude more.
MERGE_RTOL = 1e-5


def load_cell_model(cell_dir: Path, checkpoint: str | Path | None) -> tuple[CellSpec, torch.nn.Module]:
    """The trained model of one cell: backbone + method + the cell's trained tensors."""
    for name in (SPEC, WEIGHTS):
        if not (cell_dir / name).is_file():
            raise InputError(f"{cell_dir / name}: not found (is this a finished cell directory?)")
    spec = CellSpec.model_validate(read_json(cell_dir / SPEC))
    kept = cell_dir / PRESTEP  # the data-dependent choice the cell trained with (SCT, GPS, NOAH)
    state = state_for_cell(spec, kept if get_method(spec.method).prestep is not None else None)
    model = build_model(spec, checkpoint or spec.backbone.checkpoint, torch.device("cpu"), state)
    from safetensors.torch import load_file

    trained = load_file(str(cell_dir / WEIGHTS))
    missing, unexpected = model.load_state_dict(trained, strict=False)
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or wanted - set(trained):
        raise InputError(
            f"{cell_dir / WEIGHTS}: does not match {spec.method} on {spec.backbone.model} "
            f"(missing {sorted(wanted - set(trained))[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return spec, model.eval()


@torch.no_grad()
def merge_cell(cell_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> dict[str, Any]:
    cell_dir = Path(cell_dir)
    spec = CellSpec.model_validate(read_json(cell_dir / SPEC)) if (cell_dir / SPEC).is_file() else None
    if spec is not None and not get_method(spec.method).mergeable:
        raise InputError(
            f"{spec.method}: not mergeable (it adds modules or tokens that can not be folded into the "
            "backbone's weights); use the cell's trainable.safetensors with peft_core instead"
        )
    spec, model = load_cell_model(cell_dir, checkpoint)
    model = model.float()
    size = spec.image_size
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = model(x)
    merged = get_method(spec.method).merge(model)
    plain = backbones.create(spec.backbone.model, spec.num_classes, 0.0, **spec.backbone.kwargs)
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{spec.method}: merged model is not a plain {spec.backbone.model}: {err}") from None
    diff = (plain.eval()(x) - before).abs().max().item()
    tolerance = MERGE_RTOL * max(1.0, before.abs().max().item())
    if not diff <= tolerance:  # NaN included
        raise InputError(
            f"{cell_dir}: merged {spec.method} model's outputs differ from the unmerged one's by {diff:.3g} "
            f"(max abs on a fixed random batch; tolerance {tolerance:.3g}); not writing {out}"
        )
    write_safetensors(out, state, metadata={"spec": spec.canonical_json(), "merged_from": str(cell_dir)})
    return {"out": str(out), "method": spec.method, "model": spec.backbone.model, "max_abs_diff": diff}

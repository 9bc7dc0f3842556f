"""One training run's spec (:class:`CellSpec`) and its identity: the hash of every field.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import (
    Field,
    model_serializer,
)

from .sections import INITS, INTERPOLATIONS, SCHEDULES, PaceConfig, Strict, TrainResources

# --------------------------------------------------------------------- cells


def resolve_precision(precision: str, resources: TrainResources) -> str:
    """``auto`` -> bf16 where the training jobs run on a GPU, fp32 otherwise.

    Jobs get a GPU when the config asks for one (``compute.train.gpu`` or
    ``device: cuda``); with ``device: auto`` and no GPU requested, a local run
    uses CUDA when this machine has it.
    """
    if precision != "auto":
        return precision
    if resources.device == "cpu":
        return "fp32"
    if resources.device == "cuda" or resources.gpu > 0:
        return "bf16"
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


class BackboneSpec(Strict):
    model: str
    checkpoint: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # demo backbones: the pre-training that produced `checkpoint` (part of the identity)
    pretrain: dict[str, Any] | None = None


class CellSpec(Strict):
    """Everything that determines one training run; its hash is the cell's identity."""

    dataset: str
    num_classes: int
    train_split: str
    eval_split: str
    image_size: int
    normalize: str
    interpolation: Literal[INTERPOLATIONS]  # type: ignore[valid-type]
    backbone: BackboneSpec
    method: str
    hparams: dict[str, Any]
    lr: float
    weight_decay: float
    epochs: int
    warmup_epochs: int
    warmup_lr_init: float
    lr_min: float
    batch_size: int
    eval_batch_size: int
    drop_path: float
    seed: int
    schedule: Literal[SCHEDULES]  # type: ignore[valid-type]
    init: Literal[INITS]  # type: ignore[valid-type]
    precision: Literal["bf16", "fp32"]  # resolved: a CPU-fp32 and a GPU-bf16 cell never share an id
    compile: bool = False
    #: PACE regulariser; omitted from every dump when None, so cells without it keep their ids
    pace: PaceConfig | None = None

    @model_serializer(mode="wrap")
    def _omit_pace_off(self, handler) -> dict[str, Any]:
        out = handler(self)
        if out.get("pace", 0) is None:
            del out["pace"]
        return out

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def identity(self) -> dict[str, Any]:
        """The hashed fields: all of them. What the cell *read* (data caches, checkpoint
        bytes) is fingerprinted by content at run time (peft_core/fingerprint.py)."""
        return self.model_dump(mode="json")

    @property
    def cell_id(self) -> str:
        return cell_hash(self.identity())


CELL_ID = re.compile(r"^[0-9a-f]{10}$")


def cell_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical (key-sorted, compact) JSON, first 10 hex characters."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def final_cells(chosen: CellSpec, seeds: list[int], train_split: str, eval_split: str) -> list[CellSpec]:
    """The final runs of a chosen tuning cell: same configuration, final splits, one cell per seed."""
    return [
        chosen.model_copy(update={"train_split": train_split, "eval_split": eval_split, "seed": seed}) for seed in seeds
    ]

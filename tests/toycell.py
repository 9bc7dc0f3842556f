"""A toy training cell (random images, tiny ViT) for engine-level tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from peft_core.cells import BackboneSpec, CellSpec
from peft_core.results import write_torch

from .methods.checks import TINY, tiny_model


def write_inputs(root: Path, n_train: int = 64, n_eval: int = 32) -> None:
    """train.pt, eval.pt and backbone.safetensors under ``root``."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("eval", n_eval)):
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        write_torch(root / f"{split}.pt", {"images": images, "labels": torch.arange(n) % 3})
    state = {k: v for k, v in tiny_model("vit").state_dict().items() if not k.startswith("head.")}
    save_file(state, str(root / "backbone.safetensors"))


def enter(root: Path, monkeypatch, n_train: int = 64, n_eval: int = 32) -> Path:
    """The engine tests' setting: toy inputs in ``root``, the working directory there, no
    fork server, one torch thread."""
    monkeypatch.chdir(root)
    monkeypatch.delenv("PEFT_CORE_SERVER", raising=False)
    write_inputs(root, n_train, n_eval)
    torch.set_num_threads(1)
    return root


def spec(method: str = "lora", hparams: dict | None = None, epochs: int = 2, **kw) -> CellSpec:
    fields = dict(
        dataset="toy", num_classes=3, train_split="train800", eval_split="val200", image_size=32,
        normalize="none", backbone=BackboneSpec(model="vit_tiny_patch16_224", checkpoint="backbone.safetensors",
        kwargs=TINY), method=method, hparams=hparams if hparams is not None else {"rank": 2}, lr=1e-2,
        weight_decay=1e-4, epochs=epochs, warmup_epochs=1, warmup_lr_init=1e-6, lr_min=1e-5, batch_size=16,
        eval_batch_size=64, drop_path=0.1, seed=0, interpolation="bicubic", schedule="per_step",
        init="intended", precision="fp32",
    )  # fmt: skip
    fields.update(kw)
    return CellSpec(**fields)


def train_args(cell: CellSpec, out: str) -> list[str]:
    return [
        "train", "--spec-json", cell.canonical_json(), "--train-data", "train.pt", "--eval-data", "eval.pt",
        "--checkpoint", "backbone.safetensors", "--out", out, "--threads", "1", "--device", "cpu",
    ]  # fmt: skip

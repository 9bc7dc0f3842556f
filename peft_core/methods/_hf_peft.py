"""Hugging Face ``peft`` tuners on timm ViTs: the shared half of every ``peft_*`` method.

Each ``peft_*`` module holds a typed hyper-parameter model and a builder of
its ``peft`` config; this helper does the rest, the same way for all:

* **targets** are named by role (``qkv``, ``q``, ``k``, ``v``, ``o``,
  ``fc1``, ``fc2``) and resolved to explicit module paths by our own
  resolver (``_targets.resolve_targets``: exact / suffix / fullmatch, zero
  matches raise); ``peft`` receives that exact list, never a pattern.
* **fused qkv**: ``qkv`` puts one adapter on timm's fused ``attn.qkv``
  linear (every ``peft`` tuner used here accepts any ``nn.Linear``);
  ``q``/``k``/``v`` first replace ``attn.qkv`` by :class:`SplitQKV`, three
  ``nn.Linear`` row slices whose concatenated output equals the fused one
  bit for bit (tested), so each projection gets its own adapter as on a
  Hugging Face ViT's ``query``/``key``/``value``.
* **injection** builds the tuner in place (what ``peft.inject_adapter_in_model``
  does, keeping the tuner object): the engine's model stays the timm model,
  with ``peft`` layers inside it. The tuner is kept on the model (outside
  its modules and state dict) for merging and for AdaLoRA's budget schedule.
* **trainable tensors** are exactly peft's rule for ``bias='none'``: a
  parameter trains iff its name holds the tuner's prefix (``lora_``,
  ``hada_``, ...), set once more after injection because peft's move of new
  tensors to a ``meta`` base leaves AdaLoRA's ``ranknum`` trainable; the
  engine then unfreezes the head.
* **merge** is ``peft``'s ``merge_and_unload(safe_merge=True)``, then every
  :class:`SplitQKV` is fused back, so the result is a plain timm model.

``peft`` is an optional extra (``pip install -e ".[hf]"``): it is imported
only when a ``peft_*`` method is applied, so the registry, ``peft-core
methods`` and configs work without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import InputError
from ._common import freeze_all
from ._registry import HParams
from ._targets import BLOCK_LINEARS, resolve_targets, transformer_blocks

EXTRA = 'pip install -e ".[hf]"'
ADAPTER = "default"
_TUNER = "_hf_peft_tuner"  # model.__dict__ key: not a submodule, not in the state dict

Role = Literal["qkv", "q", "k", "v", "o", "fc1", "fc2"]
_SPLIT = ("q", "k", "v")
# HF-style role names over the shared block table; q/k/v are the slices SplitQKV makes of attn.qkv
_PATTERNS = {
    "qkv": BLOCK_LINEARS["qkv"],
    **{part: BLOCK_LINEARS["qkv"] + rf"\.{part}" for part in _SPLIT},
    "o": BLOCK_LINEARS["proj"],
    "fc1": BLOCK_LINEARS["fc1"],
    "fc2": BLOCK_LINEARS["fc2"],
}
TARGETS_DOC = (
    "linears that get an adapter: 'qkv' = timm's fused attn.qkv whole; 'q'/'k'/'v' = its row slices, "
    "split into separate linears first; 'o' = attn.proj; 'fc1'/'fc2' = the MLP"
)


def require_peft():
    """The ``peft`` package, or a one-line error naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise InputError(f"peft_* needs Hugging Face peft, an optional extra: {EXTRA}") from None
    return peft


class TargetsHP(HParams):
    """Base of the ``peft_*`` hyper-parameter models: which linears are adapted."""

    targets: tuple[Role, ...] = Field(("qkv",), min_length=1, description=TARGETS_DOC)

    @model_validator(mode="after")
    def _check_targets(self) -> "TargetsHP":
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: duplicates in {list(self.targets)}")
        if "qkv" in self.targets and set(_SPLIT) & set(self.targets):
            raise ValueError(f"targets: 'qkv' (fused) and 'q'/'k'/'v' (split) exclude each other, got {list(self.targets)}")
        return self


class SplitQKV(nn.Module):
    """timm's fused ``attn.qkv`` as three ``nn.Linear`` (``q``, ``k``, ``v``): ``cat([q(x), k(x), v(x)], -1)``.

    Each holds a copy of its row slice of the fused weight and bias, so the
    output equals the fused linear's (each output element is the same dot product).
    """

    def __init__(self, fused: nn.Linear):
        super().__init__()
        if fused.out_features % 3:
            raise TypeError(f"qkv linear has {fused.out_features} outputs, not 3 equal slices")
        d = fused.out_features // 3
        for i, role in enumerate(_SPLIT):
            lin = nn.Linear(fused.in_features, d, bias=fused.bias is not None,
                            device=fused.weight.device, dtype=fused.weight.dtype)  # fmt: skip
            with torch.no_grad():
                lin.weight.copy_(fused.weight[i * d : (i + 1) * d])
                if fused.bias is not None:
                    lin.bias.copy_(fused.bias[i * d : (i + 1) * d])
            lin.requires_grad_(fused.weight.requires_grad)
            self.add_module(role, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """The equivalent fused ``nn.Linear`` (after a merge, the slices hold the merged weights)."""
        parts = [self.q, self.k, self.v]
        if not all(isinstance(p, nn.Linear) for p in parts):
            raise TypeError("SplitQKV.fuse: merge the adapters first (q/k/v are not plain nn.Linear)")
        w = torch.cat([p.weight for p in parts])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=self.q.bias is not None, device=w.device, dtype=w.dtype)
        fused.weight.copy_(w)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        fused.requires_grad_(False)
        return fused


def split_qkv(model: nn.Module) -> list[str]:
    """Replace every block's ``attn.qkv`` by a :class:`SplitQKV`; returns the paths replaced."""
    paths = [p for p, _ in resolve_targets(model, [_PATTERNS["qkv"]], nn.Linear)]
    for path in paths:
        model.set_submodule(path, SplitQKV(model.get_submodule(path)))
    return paths


def fuse_qkv(model: nn.Module) -> None:
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, SplitQKV)]:
        model.set_submodule(path, mod.fuse())


def target_paths(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Explicit module paths of the roles in ``targets`` (splitting qkv first if a slice is named)."""
    transformer_blocks(model)
    if set(_SPLIT) & set(targets):
        split_qkv(model)
    paths: list[str] = []
    for role in targets:
        paths += [p for p, _ in resolve_targets(model, [_PATTERNS[role]], nn.Linear)]
    return paths


def role_paths(paths: list[str], roles: tuple[str, ...]) -> list[str]:
    """The subset of ``paths`` that plays one of ``roles`` (e.g. IA3's feed-forward modules)."""
    return [p for p in paths if any(re.fullmatch(_PATTERNS[r], p) for r in roles)]


def inject(model: nn.Module, hp: TargetsHP, build: Callable[[Any, list[str]], Any]) -> nn.Module:
    """Freeze, resolve targets, build the ``peft`` config (``build(peft, paths)``), inject in place.

    What ``peft.inject_adapter_in_model`` does, keeping the tuner: ``tuner_cls(model, config)``
    replaces the targets inside ``model`` and marks only the adapter tensors trainable.
    """
    peft = require_peft()
    freeze_all(model)
    paths = target_paths(model, hp.targets)
    config = build(peft, paths)
    tuner_cls = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    tuner = tuner_cls(model, config, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(tuner.prefix in name)
    model.__dict__[_TUNER] = tuner
    return model


def tuner(model: nn.Module):
    """The ``peft`` tuner that adapted ``model`` (its ``merge_and_unload``, AdaLoRA's allocator)."""
    found = model.__dict__.get(_TUNER)
    if found is None:
        raise ValueError(f"{type(model).__name__} carries no peft adapter (apply a peft_* method first)")
    return found


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """``peft``'s ``merge_and_unload(safe_merge=True)``, then fused qkv restored: a plain timm model."""
    tuner(model).merge_and_unload(safe_merge=True)
    del model.__dict__[_TUNER]
    model.__dict__.pop("peft_config", None)
    fuse_qkv(model)
    return model


class LoraFamilyHP(TargetsHP):
    """LoRA-shaped tuners (``peft_lora``, ``peft_dora``): ``W + s * B A``."""

    rank: int = Field(8, ge=1, description="rank r of the update B A")
    alpha: float | None = Field(None, gt=0, description="if set, scaling = alpha / rank; otherwise `scaling` is used")
    scaling: float = Field(1.0, gt=0, description="multiplier s of B A (our lora's default: 1)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapter's input (peft's lora_dropout)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else self.scaling

    def lora_kwargs(self, paths: list[str]) -> dict[str, Any]:
        """``LoraConfig`` arguments: ``lora_alpha = s * r`` so that peft's ``lora_alpha / r`` is ``s``."""
        return dict(r=self.rank, lora_alpha=self.scale * self.rank, lora_dropout=self.dropout,
                    target_modules=paths, bias="none")  # fmt: skip

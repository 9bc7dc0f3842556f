"""The reference study's *as-run* initialisation, as a named option.

Each method initialises its own tensors as intended (LoRA's ``B``, FacT's
``V``, the adapters' and Convpass's up-projections at zero, so the model is
unchanged at init): that is ``init="intended"`` and needs no call here.

The reference codebase (``model/vision_transformer.py``) builds its PEFT
modules inside ``VisionTransformerPETL.__init__`` and then calls timm's
``self.init_weights('')`` at the end of that constructor. timm's
``init_weights_vit_timm`` (the timm of the reference's torch 1.13 /
Python 3.7 era) redraws **every** ``nn.Linear`` of the model: weight
``trunc_normal_(std=0.02)``, bias zero; other module types (``Conv1d``,
``Conv2d``, bare ``nn.Parameter``) are left alone. ``experiment/build_model.py``
then loads the pretrained backbone (``load_pretrained``: backbone tensors
only, so they end up pretrained) and calls ``reset_classifier``, a fresh
``nn.Linear`` head with PyTorch's default init (Kaiming-uniform weight, bias
uniform in ``+-1/sqrt(fan_in)``; ours is timm's: trunc-normal 0.02, zero bias).

:func:`reference_init` reproduces that state on one of our models: it redraws
exactly the tensors of the method's modules that were ``nn.Linear`` in the
reference (selected by our module type, then by attribute name on that
module) and re-initialises the head. Per method:

=================  ============================================================
lora               every ``LoRALinear``: ``lora_a``, ``lora_b`` (weights)
fact_tt            ``model.fact``: ``u``, ``v``, every per-layer core (weights)
fact_tk            ``model.fact``: ``u``, ``v``; the core ``c`` and factor ``p``
                   were bare parameters there and keep their init
adapter, houlsby,  every ``BottleneckAdapter``: ``down``/``up`` weights
adaptformer        (trunc-normal) and biases (zero): the ``init`` choice
                   (zero / xavier / lora_*) no longer matters
convpass           every ``ConvBypass``: ``down``/``up`` weights and biases;
                   its 3x3 ``conv`` (an ``nn.Conv2d``) keeps its init
vqt                every ``QueryCombine``: ``combine`` (the reference's
                   ``nn.Linear(.., 1, bias=False)``, ones in the code, 0.02
                   trunc-normal as run); the queries keep VPT's init
repadapter         nothing: its projections were ``nn.Conv1d`` there
others             nothing (vpt_*, ssf, difffit, bitfit, ln, linear, full,
                   selective): their tensors are bare parameters or
                   pretrained backbone tensors
=================  ============================================================

and, for every method, the classification head (``nn.Linear.reset_parameters``).
Pretrained backbone tensors are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from timm.layers import trunc_normal_
from torch import nn

from .methods import get_method
from .methods._adapter import BottleneckAdapter
from .methods._common import classifier
from .methods._fact import TensorTrainFactors, TuckerFactors
from .methods.convpass import ConvBypass
from .methods.lora import LoRALinear
from .methods.vqt import QueryCombine

#: The two initialisations a cell can ask for.
InitScheme = Literal["intended", "reference"]

#: timm's ViT init of an ``nn.Linear`` weight: ``trunc_normal_(std=.02)`` (cut at +-2).
REFERENCE_STD = 0.02


@dataclass(frozen=True)
class Redraw:
    """On every module of type ``module``: redraw ``weights``, zero ``biases`` (attribute paths)."""

    module: type[nn.Module]
    weights: tuple[str, ...]
    biases: tuple[str, ...] = ()


_ADAPTER = (Redraw(BottleneckAdapter, ("down.weight", "up.weight"), ("down.bias", "up.bias")),)

#: What the reference's late ``init_weights`` call redrew, per method (see the module doc).
REFERENCE_REDRAWS: dict[str, tuple[Redraw, ...]] = {
    "lora": (Redraw(LoRALinear, ("lora_a", "lora_b")),),
    "fact_tt": (Redraw(TensorTrainFactors, ("u", "v", "cores")),),
    "fact_tk": (Redraw(TuckerFactors, ("u", "v")),),
    "adapter": _ADAPTER,
    "houlsby": _ADAPTER,
    "adaptformer": _ADAPTER,
    "convpass": (Redraw(ConvBypass, ("down.weight", "up.weight"), ("down.bias", "up.bias")),),
    "vqt": (Redraw(QueryCombine, ("combine",)),),
}


def _tensors(module: nn.Module, path: str) -> list[tuple[str, nn.Parameter]]:
    """The parameter at ``path`` on ``module``, or each one of a ``ParameterList`` there."""
    holder = getattr(module, path, None) if "." not in path else None
    if isinstance(holder, nn.ParameterList):
        return [(f"{path}.{i}", p) for i, p in enumerate(holder)]
    return [(path, module.get_parameter(path))]


@torch.no_grad()
def reference_init(model: nn.Module, method: str) -> list[str]:
    """Re-initialise ``model`` as the reference study's runs were; returns the touched parameter names.

    Call it after the backbone is loaded, the method applied and the head
    created, under an already-seeded torch RNG. Redraws (trunc-normal, std
    0.02, biases zero) the tensors of ``method``'s modules listed in
    :data:`REFERENCE_REDRAWS`, then resets the classification head to
    PyTorch's default ``nn.Linear`` init. Raises ``InputError`` for an unknown
    method, ``ValueError`` if the method's modules are not in ``model`` and
    ``TypeError`` if the head is not an ``nn.Linear``.
    """
    get_method(method)  # unknown names raise, listing the known ones
    names: list[str] = []
    for rule in REFERENCE_REDRAWS.get(method, ()):
        found = [(p, m) for p, m in model.named_modules() if isinstance(m, rule.module)]
        if not found:
            raise ValueError(
                f"reference_init: method {method!r} but the model has no {rule.module.__name__}"
            )
        for path, module in found:
            for attr in rule.weights:
                for name, tensor in _tensors(module, attr):
                    trunc_normal_(tensor, std=REFERENCE_STD)
                    names.append(f"{path}.{name}")
            for attr in rule.biases:
                for name, tensor in _tensors(module, attr):
                    nn.init.zeros_(tensor)
                    names.append(f"{path}.{name}")
    head = classifier(model)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"reference_init: the head is a {type(head).__name__}, not an nn.Linear")
    head.reset_parameters()
    head_path = next(p for p, m in model.named_modules() if m is head)
    names += [f"{head_path}.{n}" for n, _ in head.named_parameters()]
    return names

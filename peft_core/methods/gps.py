"""GPS (Zhang et al., CVPR 2024): per neuron, tune the k input weights with the largest gradient.

Gradient-based Parameter Selection for Efficient Fine-Tuning (Zhang, Yang,
Peng, Wen, Gong, Zheng; CVPR 2024, arXiv 2312.10136); source repository
FightingFighting/GPS (``utils/pruning.py``,
``prune_by_percentile_gradient_perCell``; ``train_gps.py``). V-PEFT Bench
lists it in its VTAB-1k table (0.22M).

**Prestep (data-dependent, cached, on the cell's training split only).** The
frozen pre-trained backbone's gradients of a supervised contrastive loss
(SupCon, temperature ``temperature``, on the normalised pre-logits of two
views of each training image; the authors' ``--contrastive --contrast-aug``)
are summed over the whole training split. For every *neuron* (output row)
of every weight matrix of the transformer blocks (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``) and of the patch embedding (its conv kernel
flattened per output channel), the ``k`` input connections with the largest
``|grad|`` are chosen (ties: lower index first).

**Tuning.** Only those ``k`` weights per neuron train (stored as a
``rows x k`` delta scattered onto the frozen weight; zero at init, so the
model is unchanged at initialisation), plus every bias of those layers (the
authors' mask trains all ``bias`` tensors and layer-scale ``gamma`` vectors,
and freezes norms, ``pos_embed`` and ``cls_token``; ViT-B/16 has no layer scale). Mergeable: the delta is added into the weight.

Count on ViT-B/16: the selected layers have ``12 (2304 + 768 + 3072 + 768) +
768 = 83,712`` neurons, each with ``k`` weights and one bias:
``83,712 (k + 1)``; k = 1 (the authors' VTAB-1k setting, ``--times_para 1``)
gives 167,424 = 0.17M. V-PEFT Bench's params column says 0.22M; the mean
VTAB-1k head (38,044) brings ours to 0.21M, so its figure is not reproduced
from the released code (the test states the difference, it is not mapped).

Deviations from the reference code (``METHOD.deviations``, docs/deviations.md):

* the second contrastive view is the horizontal flip of the image (the protocol has no augmentation; the authors use their training augmentation)
* gradients are taken in eval mode (no dropout or drop-path), so the selection is deterministic
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import LayerScale
from torch import nn

from ._common import freeze_all
from ._prestep_data import supcon_loss
from ._registry import HParams, Prestep, register_method
from ._targets import transformer_blocks


class GPSHP(HParams):
    k: int = Field(1, ge=1, description="input weights tuned per neuron (the authors' --times_para; 1 on VTAB-1k)")
    temperature: float = Field(0.07, gt=0, description="SupCon temperature of the gradient pass (authors': 0.07)")


def target_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers GPS selects in: every Linear of the transformer blocks and the patch-embedding conv."""
    blocks = transformer_blocks(model)
    prefix = next(name for name, mod in model.named_children() if mod is blocks)
    layers = [(f"{prefix}.{path}", mod) for path, mod in blocks.named_modules() if isinstance(mod, nn.Linear)]
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        layers.insert(0, ("patch_embed.proj", proj))
    if not layers:
        raise ValueError(f"gps: {type(model).__name__} has no Linear layers in its blocks")
    return layers


class SparseDelta(nn.Module):
    """A frozen Linear or Conv2d whose weight gets ``delta`` at fixed ``(row, index)`` positions."""

    def __init__(self, base: nn.Linear | nn.Conv2d, index: torch.Tensor):
        super().__init__()
        rows = base.weight.shape[0]
        if index.ndim != 2 or index.shape[0] != rows:
            raise ValueError(f"gps: selection of shape {tuple(index.shape)} does not fit a weight with {rows} rows")
        self.base = base
        self.register_buffer("index", index.to(device=base.weight.device, dtype=torch.long).clone())
        self.delta = nn.Parameter(torch.zeros(index.shape, device=base.weight.device, dtype=base.weight.dtype))
        if base.bias is not None:
            base.bias.requires_grad_(True)

    def weight(self) -> torch.Tensor:
        w = self.base.weight
        flat = w.reshape(w.shape[0], -1).scatter_add(1, self.index, self.delta.to(w.dtype))
        return flat.view_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        if isinstance(b, nn.Linear):
            return F.linear(x, self.weight(), b.bias)
        return F.conv2d(x, self.weight(), b.bias, b.stride, b.padding, b.dilation, b.groups)


def _flip_pair(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.flip(x, dims=[-1])])


def compute(model: nn.Module, hp: GPSHP, data) -> dict[str, torch.Tensor]:
    """Top-k |grad| input connections per neuron, from a SupCon pass over the training split."""
    layers = target_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [mod.weight for _, mod in layers]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    model.eval()
    for x, y in data.batches():
        feats = model.forward_head(model.forward_features(_flip_pair(x)), pre_logits=True)
        supcon_loss(feats, y, hp.temperature).backward()
    out = {}
    for (path, _), w in zip(layers, weights):
        grad = w.grad.abs().reshape(w.shape[0], -1).float()
        if hp.k > grad.shape[1]:
            raise ValueError(f"k {hp.k} > the {grad.shape[1]} inputs of {path}")
        # stable descending order: ties go to the lower input index
        order = torch.sort(-grad, dim=1, stable=True).indices[:, : hp.k]
        out[path] = torch.sort(order, dim=1).values
        w.requires_grad_(False)
        w.grad = None
    return out


def placeholder(model: nn.Module, hp: GPSHP) -> dict[str, torch.Tensor]:
    """The first k inputs of every neuron (the shapes and count of a real selection)."""
    out = {}
    for path, mod in target_layers(model):
        rows, cols = mod.weight.shape[0], mod.weight[0].numel()
        if hp.k > cols:
            raise ValueError(f"k {hp.k} > the {cols} inputs of {path}")
        out[path] = torch.arange(hp.k).expand(rows, hp.k).clone()
    return out


def prestep_key(hp: GPSHP) -> dict:
    return {"k": hp.k, "temperature": hp.temperature}


def apply(model: nn.Module, hp: GPSHP, state: dict | None = None) -> nn.Module:
    freeze_all(model)
    state = placeholder(model, hp) if state is None else state
    for path, mod in target_layers(model):
        if path not in state:
            raise ValueError(f"gps: prestep result has no selection for {path}")
        model.set_submodule(path, SparseDelta(mod, state[path]))
    for mod in model.modules():  # the authors' mask trains every `gamma` (layer scale) too
        if isinstance(mod, LayerScale):
            mod.gamma.requires_grad_(True)
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Add every delta into its weight and put the plain layer back."""
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, SparseDelta)]:
        mod.base.weight.copy_(mod.weight())
        model.set_submodule(path, mod.base)
    return model


DEVIATIONS = (
    "the second contrastive view is the horizontal flip of the image (the protocol has no augmentation; the authors use their training augmentation)",
    "gradients are taken in eval mode (no dropout or drop-path), so the selection is deterministic",
)

METHOD = register_method(
    "gps",
    GPSHP,
    apply,
    merge,
    deviations=DEVIATIONS,
    prestep=Prestep(compute=compute, key=prestep_key, placeholder=placeholder),
)

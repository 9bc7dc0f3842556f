"""What a method's prestep reads (:class:`PrestepData`) and the statistics SCT and GPS take of it.

The engine (peft_core/prestep.py) fills :class:`PrestepData` from the data
caches; the methods see only these tensors, never a path, so a prestep is a
pure function of the images, labels, backbone and hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._targets import transformer_blocks


@dataclass(frozen=True)
class PrestepData:
    """The training split (and, for ``reads="train+val"``, the validation split) of one task.

    ``images`` are uint8 ``N x 3 x H x W`` on the compute device; ``prepare``
    turns a slice of them into the model's float input (the study's
    normalisation). ``seed`` seeds anything random the step does.
    """

    images: torch.Tensor
    labels: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int
    seed: int
    log: Callable[[str], None]
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    def batches(self, val: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float images, labels) in split order, ``batch_size`` at a time."""
        x, y = (self.val_images, self.val_labels) if val else (self.images, self.labels)
        if x is None or y is None:
            raise ValueError("this prestep reads the validation split, but none was given")
        for start in range(0, x.shape[0], self.batch_size):
            yield self.prepare(x[start : start + self.batch_size]), y[start : start + self.batch_size]


@torch.no_grad()
def salience_after_attention(model: nn.Module, data: PrestepData) -> list[torch.Tensor]:
    """SCT's class-aware salience of every channel at every block (a ``C`` vector per block).

    The features are the residual stream after the attention branch (``norm2``'s
    input), patch tokens only (class and register tokens dropped). For each
    class ``c`` the L2 norm per channel over all of that class's tokens is
    ``sqrt(sum of squares)``; the salience is its mean over the classes present.
    Sums of squares are accumulated batch by batch (ViT-B on 800 images would be
    ~6 GB of features), in float64 so the order of batches cannot move a ranking.
    """
    blocks = transformer_blocks(model)
    prefix = getattr(model, "num_prefix_tokens", 1)
    classes = torch.unique(data.labels).cpu()
    sums: list[torch.Tensor | None] = [None] * len(blocks)
    current: dict[str, torch.Tensor] = {}

    def hook(i):
        def take(_module, args):
            tokens = args[0][:, prefix:].double()  # B x L x C
            per_image = tokens.pow(2).sum(1).cpu()  # B x C
            onehot = (current["y"][:, None] == classes[None, :]).double()  # B x classes
            add = onehot.T @ per_image  # classes x C
            sums[i] = add if sums[i] is None else sums[i] + add

        return take

    hooks = [block.norm2.register_forward_pre_hook(hook(i)) for i, block in enumerate(blocks)]
    try:
        model.eval()
        for x, y in data.batches():
            current["y"] = y.cpu()
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [s.sqrt().mean(0).float() for s in sums]


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, "SupCon" L_out) over ``2B`` views.

    ``features``: ``2B x D`` (view 1 of each image, then view 2); positives of
    an anchor are every other view with its label.
    """
    z = F.normalize(features.float(), dim=1)
    y = torch.cat([labels, labels])
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(y), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~self_mask
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)) / positive.sum(1).clamp(min=1)
    return per_anchor.mean()

"""Upstream pre-training of the demo backbone (CPU, about a minute and a half).

Trains the configured timm ViT on :func:`peft_core.demo.upstream_task`: every
image carries a label for each of :data:`~peft_core.demo.UPSTREAM_ATTRIBUTES`
(shape, hue, size, position, background kind and orientation), and the single
head is split into one softmax per attribute (summed cross-entropies). A
multi-attribute task is the demo's stand-in for ImageNet: features that must
tell many concepts apart transfer to downstream tasks that share none of the
images, whereas a one-concept task (our first demo's shape x colour) gave
frozen features too poor for a linear probe. Saves the backbone (head
included, as real checkpoints do) as safetensors, with the held-out accuracy of
each attribute in the file's metadata (:func:`peft_core.demo.upstream_metadata`). Downstream
cells load it through :mod:`peft_core.backbones`, exactly as they load ViT-B/16.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backbones
from .sections import BackboneConfig
from .demo import NO_LABEL, UPSTREAM_ATTRIBUTES, upstream_task

HELD_OUT = 1000


def multi_attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the cross-entropy of that attribute's slice of the head."""
    parts = logits.split(list(UPSTREAM_ATTRIBUTES.values()), dim=1)
    return sum(F.cross_entropy(part, labels[:, j], ignore_index=NO_LABEL) for j, part in enumerate(parts))


def attribute_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy of each attribute, over the images that have it."""
    parts = logits.split(list(UPSTREAM_ATTRIBUTES.values()), dim=1)
    out = {}
    for j, (name, part) in enumerate(zip(UPSTREAM_ATTRIBUTES, parts)):
        has = labels[:, j] != NO_LABEL
        out[name] = round(float((part.argmax(1) == labels[:, j])[has].float().mean()), 4)
    return out


def pretrain_demo(backbone: BackboneConfig, out: str | Path, threads: int = 2, log=None) -> dict[str, float]:
    """Pre-train and save; returns the held-out accuracy per attribute (and their mean)."""
    from safetensors.torch import save_file

    from .results import _atomic

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg = backbone.pretrain
    if cfg is None:
        raise ValueError("backbone.pretrain is not set")
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    imgs, labels = upstream_task(cfg.images + HELD_OUT, cfg.seed)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels)
    x_tr, y_tr, x_te, y_te = x[:-HELD_OUT], y[:-HELD_OUT], x[-HELD_OUT:], y[-HELD_OUT:]
    model = backbones.create(backbone.model, sum(UPSTREAM_ATTRIBUTES.values()), 0.0, **backbone.kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    steps = cfg.epochs * math.ceil(len(x_tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total = torch.zeros(())
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            loss = multi_attribute_loss(model(x_tr[idx].float() / 255), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        log(f"pretrain epoch {epoch + 1}/{cfg.epochs} loss {float(total) / len(x_tr):.4f}")
    model.eval()
    with torch.inference_mode():
        acc = attribute_accuracy(model(x_te.float() / 255), y_te)
    acc["mean"] = round(sum(acc.values()) / len(acc), 4)
    log(f"pretrain upstream held-out accuracy {json.dumps(acc)}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes its metadata map in no fixed order, so two keys
    # could make two runs' files differ in bytes (and every cell look stale) with equal weights.
    meta = {"upstream": json.dumps({"accuracy": acc, "images": cfg.images, "epochs": cfg.epochs}, sort_keys=True)}
    _atomic(Path(out), lambda tmp: save_file(state, tmp, metadata=meta))
    return acc


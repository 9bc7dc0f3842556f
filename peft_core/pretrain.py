"""Upstream pre-training of the demo backbone (CPU, about a minute).

Trains the configured timm ViT on :func:`peft_core.demo.upstream_task` and
saves the backbone (head included, as real checkpoints do) as safetensors.
Downstream cells then load it through :mod:`peft_core.backbones`, exactly as
they would load ViT-B/16.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backbones
from .config import BackboneConfig
from .demo import UPSTREAM_COLOURS, UPSTREAM_SHAPES, upstream_task


def pretrain_demo(backbone: BackboneConfig, out: str | Path, threads: int = 2, log=None) -> float:
    """Pre-train and save; returns the upstream held-out accuracy."""
    from safetensors.torch import save_file

    from .results import _atomic

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg = backbone.pretrain
    if cfg is None:
        raise ValueError("backbone.pretrain is not set")
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    n_cls = len(UPSTREAM_SHAPES) * len(UPSTREAM_COLOURS)
    imgs, labels = upstream_task(cfg.images + 1000, cfg.seed)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels)
    x_tr, y_tr, x_te, y_te = x[:-1000], y[:-1000], x[-1000:], y[-1000:]
    model = backbones.create(backbone.model, n_cls, 0.0, **backbone.kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    steps = cfg.epochs * math.ceil(len(x_tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            xb = x_tr[idx].float() / 255
            if torch.rand((), generator=gen) < 0.5:  # cheap augmentation: horizontal flip
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        log(f"pretrain epoch {epoch + 1}/{cfg.epochs} loss {total / len(x_tr):.4f}")
    model.eval()
    with torch.inference_mode():
        acc = float((model(x_te.float() / 255).argmax(1) == y_te).float().mean())
    log(f"pretrain upstream held-out accuracy {acc:.4f}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    _atomic(Path(out), lambda tmp: save_file(state, tmp, metadata={"upstream_accuracy": f"{acc:.4f}"}))
    return acc

"""Batched packs: the cells of one tuning pack trained as one vmapped model.

A pack's cells (lr x weight decay of one method configuration; or the seeds of
a final run) share the architecture and the frozen backbone. Trained one after
another, each runs small batches that leave a GPU mostly idle. Here they train
together (``compute.train.batched_packs``): every cell is built exactly as it
would be alone (``torch.manual_seed(seed)`` then ``build_model``), the frozen
tensors that are equal in every cell are shared (one copy in memory), and each
step calls ``torch.func.vmap(functional_call)`` over the cells' trainable
tensors stacked along a new first dimension, on a ``[C, B, 3, H, W]`` input in
which cell ``c``'s slice is the batch its own ``torch.Generator`` drew. The
per-cell losses are summed and back-propagated once: cell ``c``'s tensors get
exactly the gradient of its own loss (the cells share no trainable tensor).
The stacked tensors are ``torch.stack`` of each cell's own ``nn.Parameter``,
so each cell keeps its own optimiser, built by ``train.make_optimizer`` with its
own lr and weight decay and stepped with its own schedule: the update is
torch's AdamW itself, not a re-implementation. Evaluation runs each cell's
model alone (``train.evaluate``), and ``train.write_cell`` writes the same
files and metrics.json fields as a solo cell, plus ``batched: true`` and
``batched_cells``.

Exactness. vmap turns some kernels into others (a linear with a per-cell
bias or weight becomes a batched matmul and a separate add; bias gradients
are summed in another order), so a batched cell equals its solo run up to
fp32 rounding, not bit for bit in general. Measured on the tiny random-weight
ViT of tests/unit/test_batched.py (CPU, fp32, 2 epochs, 4 cells): LoRA's
weights and logits bit-identical; BitFit's logits within 2.1e-7 and weights
within 2.2e-4 (Adam's normalised step turns a rounding-level change of a ~0
gradient into up to ~lr on that element); head-only cells within 1.2e-7;
losses within 1e-6, status, diverged epoch and accuracy equal. The test
allows 1e-3 on weights and 1e-5 on logits. Under CPU bf16 autocast (the GPU
path's precision) LoRA's weights differ by up to 2.2e-2 at lr 1e-2 (about
two Adam steps on elements whose bf16 gradient rounds the other way) and
losses by 5e-5, training accuracy equal (tested with 5e-2 and 5e-4). On a GPU (other kernels) the
differences are rounding too but are not measured here. So
``batched`` is part of what a cell's result is: packs reuse a finished cell
only when it was trained the way it would be trained now
(peft_core/packs.reuse_verdict, ``batched``), so batched and solo results are
never mixed silently; the cell id does not change.

Scope: a cell trains batched only when nothing in its training is random or
stateful beyond its parameters and optimiser: no step hook (AdaLoRA), no
prestep, no PACE, no ``torch.compile``, no cached features, no active dropout
or drop-path (vmap draws one mask for all cells, not the solo run's masks), no
BatchNorm running statistics, and a trial forward under ``vmap`` with
``randomness="error"`` succeeds (this catches a method drawing random numbers
itself). Otherwise it trains alone, and the log says why. Cells that differ in
anything but lr, weight decay and seed train in separate batches.

Preemption: a batched pack saves every running cell's state in the solo format
(``train.save_resume``) to ``resume-batched.pt`` in its directory at the epoch
boundary; the rerun resumes the batch when all its cells saved the same epoch,
and otherwise starts the batch over (logged). A solo ``resume.pt`` is not
resumed by the batched path.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.func import functional_call, vmap

from .cells import CellSpec
from .data import load_split, to_float
from .methods import get_method
from .packs import cell_lock, cell_path, manifest_row, pack_id, reuse_verdict
from .preempt import Preempted, preemption_flag
from .results import write_json
from .train import (
    Outcome, autocast_dtype, build_model, load_resume, lr_at, make_optimizer, save_resume, setup_process, write_cell,
)  # fmt: skip

RESUME_BATCHED = "resume-batched.pt"
#: the spec fields cells of one batch may differ in
PER_CELL = ("lr", "weight_decay", "seed")


def spec_reason(spec: CellSpec, features: bool = False) -> str | None:
    """Why this cell can not train batched, from its spec alone (None: it may)."""
    method = get_method(spec.method)
    if method.step_hook is not None:
        return f"method {spec.method!r} changes itself while training (step hook)"
    if method.prestep is not None:
        return f"method {spec.method!r} has a prestep"
    if spec.pace is not None:
        return "train.pace is set"
    if spec.compile:
        return "train.compile is set"
    if features:
        return "the cell trains on cached features"
    if spec.drop_path > 0:
        return f"drop_path {spec.drop_path}: vmap would draw other masks than the solo run"
    return None


def model_reason(model: nn.Module) -> str | None:
    """Why this built model can not train batched: an active dropout or drop-path, or a
    BatchNorm with running statistics (None: training is a function of parameters and data)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name} is a dropout (p={m.p}): vmap would draw other masks than the solo run"
        if isinstance(m, DropPath) and m.drop_prob > 0:
            return f"{name} is a drop-path (p={m.drop_prob})"
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            return f"{name} is a BatchNorm (running statistics are state outside the parameters)"
    return None


def batch_key(spec: CellSpec) -> str:
    """Cells with the same key can share a batch (they differ only in :data:`PER_CELL`)."""
    return json.dumps(spec.model_dump(mode="json", exclude=set(PER_CELL)), sort_keys=True)


def cell_reason(spec: CellSpec, checkpoint: str | Path | None, features: bool = False) -> str | None:
    """Why ``spec`` trains alone (None: batched): :func:`spec_reason`, then the built model
    (:func:`model_reason`) and a trial batched forward that must draw no random numbers."""
    why = spec_reason(spec, features)
    if why:
        return why
    torch.manual_seed(spec.seed)
    model = build_model(spec, checkpoint, torch.device("cpu"))
    why = model_reason(model)
    if why:
        return why
    params = {n: torch.stack([p.detach()] * 2) for n, p in model.named_parameters() if p.requires_grad}
    probe = torch.zeros(2, 1, 3, spec.image_size, spec.image_size)
    try:
        with torch.no_grad(), _quiet():
            vmap(_forward(model), randomness="error")(params, probe, torch.zeros(2, 1, dtype=torch.long))
    except RuntimeError as err:
        return f"the model does not run under vmap ({str(err).splitlines()[0]})"
    return None


def _forward(model: nn.Module):
    """One cell's (loss, logits) from its tensors ``params``; the rest of ``model`` is shared."""

    def one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        logits = functional_call(model, params, (x,), strict=False)
        return F.cross_entropy(logits, y), logits

    return one


@contextmanager
def _quiet():
    """Silence vmap's "no batching rule, falling back to a loop" performance warnings
    (CPU attention: the loop runs the solo kernel once per cell)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


def share_frozen(models: list[nn.Module]) -> list[str]:
    """Make every frozen tensor that is equal in all models one shared tensor; returns the
    names of those that differ (e.g. a method's random frozen projection under another seed)."""
    first = dict(_frozen(models[0]))
    others = [dict(_frozen(m)) for m in models[1:]]
    varying = [n for n, t in first.items() if any(not torch.equal(t, o[n]) for o in others)]
    with torch.no_grad():
        for other in others:
            for name, t in other.items():
                if name not in varying:
                    t.data = first[name].data
    return varying


def _frozen(model: nn.Module):
    yield from ((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    yield from ((n, b) for n, b in model.named_buffers() if b is not None)


def cell_tensors(models: list[nn.Module], names: list[str]) -> dict[str, list[torch.Tensor]]:
    """Each vmapped tensor's per-cell tensors (collected once: walking the modules every step costs)."""
    tensors = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in models]
    return {n: [t[n] for t in tensors] for n in names}


def stacked(tensors: dict[str, list[torch.Tensor]], cells: list[int]) -> dict[str, torch.Tensor]:
    """The vmapped tensors of cells ``cells``: the trainable ones (differentiable stacks of each
    cell's own parameters) and the frozen ones that differ between cells."""
    return {n: torch.stack([ts[c] for c in cells]) for n, ts in tensors.items()}


def train_batched(models, specs: list[CellSpec], x: torch.Tensor, y: torch.Tensor, log, resumes: list[Path],
                  flag: dict | None, finish: Callable[[int, Outcome], None]) -> list[Outcome]:  # fmt: skip
    """Train the cells together (see the module docstring); ``finish(c, outcome)`` is called
    for a cell that diverged, at the epoch it did, as a solo run would stop there."""
    spec0, n, dev = specs[0], x.shape[0], x.device
    trainable = [name for name, p in models[0].named_parameters() if p.requires_grad]
    tensors = cell_tensors(models, trainable + share_frozen(models))
    opts = [make_optimizer([p for p in m.parameters() if p.requires_grad], s, dev) for m, s in zip(models, specs)]
    gens = [torch.Generator(device="cpu").manual_seed(s.seed) for s in specs]
    steps_per_epoch = math.ceil(n / spec0.batch_size)
    fwd = vmap(_forward(models[0]), randomness="error")
    dtype = autocast_dtype(spec0.precision)
    outs = [Outcome() for _ in specs]
    first_epoch, step = resume_batch(resumes, specs, models, opts, gens, outs, log)
    active = list(range(len(specs)))
    for m in models:
        m.train()
    for epoch in range(first_epoch, spec0.epochs):
        t0 = time.perf_counter()
        orders = {c: torch.randperm(n, generator=gens[c]).to(dev) for c in active}
        cells = torch.tensor(active, device=dev)
        loss_sum = torch.zeros(len(specs), device=dev)
        correct = torch.zeros(len(specs), device=dev, dtype=torch.long)
        for start in range(0, n, spec0.batch_size):
            idx = torch.stack([orders[c][start : start + spec0.batch_size] for c in active])  # [A, B]
            for c in active:
                for group in opts[c].param_groups:
                    group["lr"] = lr_at(step, steps_per_epoch, specs[c])
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None), _quiet():
                losses, logits = fwd(stacked(tensors, active), to_float(x[idx], spec0.normalize),
                                     y[idx])  # fmt: skip
            for c in active:
                opts[c].zero_grad(set_to_none=True)
            losses.sum().backward()
            for c in active:
                opts[c].step()
            loss_sum.index_add_(0, cells, losses.detach() * idx.shape[1])
            correct.index_add_(0, cells, (logits.detach().argmax(-1) == y[idx]).sum(1))
            step += 1
        rate = n * len(active) / (time.perf_counter() - t0)
        active = _end_epoch(epoch, active, specs, outs, loss_sum.tolist(), correct.tolist(), n, log, finish)
        log(f"epoch {epoch + 1}/{spec0.epochs} batched x{len(specs)} {rate:.0f} img/s")
        if not active:
            break
        if flag is not None and flag["hit"] and epoch + 1 < spec0.epochs:
            for c in active:
                save_resume(resumes[c], specs[c], models[c], opts[c], gens[c], epoch + 1, step, outs[c].images)
            log(f"preempted: the batch's states saved ({RESUME_BATCHED}) after epoch {epoch + 1}")
            raise Preempted(str(resumes[active[0]]))
    return outs


def _end_epoch(epoch, active, specs, outs, loss_sum, correct, n, log, finish) -> list[int]:
    """Record each running cell's epoch; a cell whose loss is not finite stops (``finish``)."""
    still = []
    for c in active:
        outs[c].images += n
        outs[c].final_loss, outs[c].final_accuracy = loss_sum[c] / n, correct[c] / n
        log(f"{specs[c].cell_id}: epoch {epoch + 1}/{specs[c].epochs} loss {outs[c].final_loss:.4f}")
        if math.isfinite(outs[c].final_loss):
            still.append(c)
        else:
            outs[c].status, outs[c].diverged_epoch = "diverged", epoch + 1
            finish(c, outs[c])
    return still


def resume_batch(resumes: list[Path], specs, models, opts, gens, outs, log) -> tuple[int, int]:
    """(first epoch, step): from the cells' saved states when all saved the same one, else (0, 0)."""
    if not any(p.is_file() for p in resumes):
        return 0, 0
    marks = {_mark(p) for p in resumes}
    if len(marks) != 1 or None in marks:
        log(f"the cells' {RESUME_BATCHED} states are not all of one step: the batch starts over")
        for p in resumes:
            p.unlink(missing_ok=True)
        return 0, 0
    epoch, step = marks.pop()
    for p, s, m, o, g, out in zip(resumes, specs, models, opts, gens, outs):
        out.images = load_resume(p, s, m, o, g)[2]
    log(f"resumed the batch from {RESUME_BATCHED} at epoch {epoch + 1}")
    return epoch, step


def _mark(path: Path) -> tuple[int, int] | None:
    """(epoch, step) of a saved state, None if there is none."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["epoch"], state["step"]


def run_batched(specs: list[CellSpec], dirs: list[Path], train_data: str | Path, eval_data: str | Path,
                checkpoint: str | Path | None, threads: int = 1, device: str = "auto", log=print,
                code: str | None = None, inputs: dict | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Build, train, evaluate and write the cells of one batch (one :func:`batch_key`), as
    ``train.run_cell`` would each; returns their metrics."""
    t_start = time.perf_counter()
    dev = setup_process(threads, device)
    train_split, eval_split = load_split(train_data, dev), load_split(eval_data, dev)
    models = []
    for spec in specs:  # each cell's draws exactly as alone
        torch.manual_seed(spec.seed)
        models.append(build_model(spec, checkpoint, dev))
    t_loaded = time.perf_counter()
    extra = {"batched": True, "batched_cells": len(specs)}
    results: dict[int, dict[str, Any]] = {}

    def finish(c: int, outcome: Outcome) -> None:
        times = (t_start, t_loaded, time.perf_counter())
        results[c] = write_cell(specs[c], models[c], outcome, eval_split, dev, dirs[c], times, threads, log, code,
                                inputs, extra=extra, n_train=int(len(train_split.labels)))  # fmt: skip
        (dirs[c] / RESUME_BATCHED).unlink(missing_ok=True)

    resumes = [d / RESUME_BATCHED for d in dirs]
    with preemption_flag() as flag:
        outcomes = train_batched(models, specs, train_split.images, train_split.labels, log, resumes, flag, finish)
    for c, outcome in enumerate(outcomes):
        if c not in results:
            finish(c, outcome)
    return [results[c] for c in range(len(specs))]


#: train one cell alone into its directory (``train.run_cell``); train a batch (:func:`run_batched`)
Solo = Callable[[CellSpec, Path], dict[str, Any]]
Batch = Callable[[list[CellSpec], list[Path]], list[dict[str, Any]]]


def run_batched_pack(specs: list[CellSpec], solo: Solo, batched: Batch, reason: Callable[[CellSpec], str | None],
                     cells_root: str | Path, code: str, manifest: str | Path, log: Callable[[str], None],
                     inputs: dict | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """``packs.run_pack`` with ``compute.train.batched_packs``: same cells, files and manifest.

    A cell with ``reason(spec)`` None trains batched with the others of its
    :func:`batch_key` (``batched(specs, dirs)``), any other alone (``solo``); a finished
    cell is reused only when it was trained that way. All the pack's cells are locked
    (in cell-id order, the same in every job) while it runs.
    """
    dirs = {s.cell_id: cell_path(cells_root, s) for s in specs}
    names = {s.cell_id: f"{s.dataset}/{s.method}/{s.cell_id}" for s in specs}
    with ExitStack() as locks:
        for cell in sorted(dirs):
            locks.enter_context(cell_lock(dirs[cell], log))
        done, todo = plan_pack(specs, dirs, reason, code, inputs)
        for cell, (metrics, _why) in done.items():
            log(f"{names[cell]}: reused (same spec, code, inputs and training path)")
        for group in _groups([s for s in specs if s.cell_id in todo and todo[s.cell_id][1] is None]):
            for s in group:
                log(f"{names[s.cell_id]}: training batched with {len(group)} cells ({todo[s.cell_id][0]})")
            for s, metrics in zip(group, batched(group, [dirs[s.cell_id] for s in group])):
                done[s.cell_id] = (metrics, todo[s.cell_id][0])
        for s in (s for s in specs if s.cell_id in todo and todo[s.cell_id][1] is not None):
            why, alone = todo[s.cell_id]
            log(f"{names[s.cell_id]}: training alone, not batched: {alone} ({why})")
            done[s.cell_id] = (solo(s, dirs[s.cell_id]), why)
        rows = [manifest_row(s, dirs[s.cell_id], done[s.cell_id][0], s.cell_id not in todo, done[s.cell_id][1])
                for s in specs]  # fmt: skip
    write_json(manifest, {"pack": pack_id(specs), "code": code, "cells": rows})
    return rows


def plan_pack(specs, dirs, reason, code, inputs) -> tuple[dict, dict]:
    """({cell: (metrics, "")} reusable, {cell: (why it trains, why not batched or None)}).

    ``reason`` (it builds a model) is asked once per :func:`batch_key`, and only for a
    cell that is not already reusable as a batched result.
    """
    reasons: dict[str, str | None] = {}
    done, todo = {}, {}
    for spec in specs:
        metrics, why = reuse_verdict(dirs[spec.cell_id], spec, code, inputs, batched=True)
        if metrics is not None:
            done[spec.cell_id] = (metrics, "")
            continue
        key = batch_key(spec)
        if key not in reasons:
            reasons[key] = reason(spec)
        if reasons[key] is not None:
            metrics, why = reuse_verdict(dirs[spec.cell_id], spec, code, inputs, batched=False)
            if metrics is not None:
                done[spec.cell_id] = (metrics, "")
                continue
        todo[spec.cell_id] = (why, reasons[key])
    return done, todo


def _groups(specs: list[CellSpec]) -> list[list[CellSpec]]:
    """The cells by :func:`batch_key`, in order of first appearance."""
    groups: dict[str, list[CellSpec]] = {}
    for spec in specs:
        groups.setdefault(batch_key(spec), []).append(spec)
    return list(groups.values())

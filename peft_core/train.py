"""The training engine for one cell: AdamW, linear warm-up then cosine, top-1.

Data are uint8 tensors loaded onto the device once; batches are sliced there.
The loss is accumulated on the device and read once per epoch (no host sync
per step); a non-finite epoch loss stops the cell as ``diverged``.
"""

from __future__ import annotations

import math
import os
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import __version__, backbones
from .cells import CellSpec
from .errors import InputError
from .data import load_split, to_float
from .methods import get_method
from .methods._common import count_backbone, count_head, count_trainable, trainable_names, unfreeze_head
from .metrics import ppt
from .pace import Pace, check_method
from .preempt import PREEMPT_SIGNALS, Preempted, preemption_flag  # noqa: F401 (re-exported)
from .prestep import keep_in_cell, state_for_cell
from .results import METRICS, PREDICTIONS, RESUME, SPEC, WEIGHTS, write_json, write_parquet, write_safetensors, write_torch


def lr_at(step: int, steps_per_epoch: int, spec: CellSpec) -> float:
    """The learning rate of optimiser step ``step`` (0-based) under ``spec.schedule``."""
    if spec.schedule == "reference_epoch":
        return reference_epoch_lr(step // steps_per_epoch, spec)
    warm = spec.warmup_epochs * steps_per_epoch
    total = spec.epochs * steps_per_epoch
    if step < warm:
        return spec.warmup_lr_init + (spec.lr - spec.warmup_lr_init) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return spec.lr_min + 0.5 * (spec.lr - spec.lr_min) * (1 + math.cos(math.pi * progress))


def reference_epoch_lr(epoch: int, spec: CellSpec) -> float:
    """The lr of epoch ``epoch`` (0-based) as the reference codebase runs it.

    It builds timm's ``CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs,
    warmup_lr_init, lr_min)`` (no warm-up prefix: the cosine counts from epoch 0)
    and calls ``scheduler.step(epoch)`` at the *end* of epoch ``epoch``, which
    sets the value of ``epoch`` itself; so epoch 0 and 1 both run at
    ``warmup_lr_init`` and epoch ``e >= 1`` runs at timm's value for ``e - 1``.
    """
    t = max(epoch - 1, 0)
    if t < spec.warmup_epochs:
        return spec.warmup_lr_init + t * (spec.lr - spec.warmup_lr_init) / spec.warmup_epochs
    return spec.lr_min + 0.5 * (spec.lr - spec.lr_min) * (1 + math.cos(math.pi * t / spec.epochs))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but CUDA is not available")
    return torch.device(name)


def apply_method(method, model: torch.nn.Module, hp, state: dict | None = None) -> torch.nn.Module:
    """``method.build``, with "does not fit this backbone" errors as one-line input errors.

    ``state``: the method's prestep result (peft_core/prestep.py), for methods that have one.
    """
    try:
        return method.build(model, hp, state)
    except (ValueError, TypeError, IndexError) as err:
        raise InputError(f"methods.{method.name}: {err}") from None


def build_model(
    spec: CellSpec, checkpoint: str | Path | None, device: torch.device, state: dict | None = None
) -> torch.nn.Module:
    """Backbone from the checkpoint, new head, then the method applied (with its prestep result, if any)."""
    method = get_method(spec.method)
    hp = method.hparams(**spec.hparams)
    model = backbones.build(spec.backbone.model, checkpoint, spec.num_classes, spec.drop_path, spec.backbone.kwargs)
    apply_method(method, model, hp, state)
    if spec.init == "reference":
        from .init import reference_init

        reference_init(model, spec.method)
    unfreeze_head(model)
    return model.to(device)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) where the spec says bf16; else plain fp32.

    The spec's precision is resolved when the study is planned (config.resolve_precision).
    """
    return torch.bfloat16 if precision == "bf16" else None


def make_optimizer(params: list[torch.nn.Parameter], spec: CellSpec, device: torch.device) -> torch.optim.AdamW:
    """AdamW; on CUDA the fused kernel (one launch for all tensors instead of several per tensor)."""
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=device.type == "cuda")


def forward_fn(model: torch.nn.Module, spec: CellSpec):
    """The module to call: ``torch.compile``d when the spec asks (static shapes; the
    last partial batch and evaluation each compile once more)."""
    return torch.compile(model, dynamic=False) if spec.compile else model


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Outcome:
    status: str = "ok"
    diverged_epoch: int | None = None
    final_loss: float = float("nan")
    #: accuracy on the last epoch's training batches, in train mode (dropout and drop-path on)
    final_accuracy: float = float("nan")
    images: int = 0


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trained_state(model) -> dict[str, torch.Tensor]:
    """What training changed: the trainable parameters plus the running statistics of
    BatchNorm layers (buffers, e.g. the linear probe's ``norm='batchnorm'``), which a
    reloaded cell needs to give the logits it gave."""
    out = dict(_trainable(model))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
            prefix = f"{name}." if name else ""
            out.update({prefix + k: b for k, b in module.named_buffers(recurse=False) if b is not None})
    return out


def save_resume(path: Path, spec: CellSpec, model, opt, gen, epoch: int, step: int, images: int) -> None:
    state = {
        "cell": spec.cell_id,
        "epoch": epoch,
        "step": step,
        "images": images,
        "params": {n: p.detach().cpu() for n, p in trained_state(model).items()},
        "optimizer": opt.state_dict(),
        "gen": gen.get_state(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    hook = get_method(spec.method).step_hook
    if hook is not None:
        state["step_hook"] = hook.state(model)
    write_torch(path, state)


def load_resume(path: Path, spec: CellSpec, model, opt, gen) -> tuple[int, int, int]:
    """Restore a saved state; returns (next epoch, step, images seen)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("cell") != spec.cell_id:
        raise InputError(f"{path}: resume state of cell {state.get('cell')}, not {spec.cell_id}")
    with torch.no_grad():
        for n, p in trained_state(model).items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    hook = get_method(spec.method).step_hook
    if hook is not None:
        hook.load_state(model, state["step_hook"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["epoch"], state["step"], state["images"]


def train(
    model,
    spec: CellSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    log,
    resume: Path | None = None,
    flag: dict | None = None,
    head: torch.nn.Module | None = None,
    stop_at: int | None = None,
) -> Outcome:
    """Train ``model`` on images ``x``; with ``head``, ``x`` are the cached inputs of that
    head (peft_core/features.py) and only the head runs: same parameters, draws and steps.
    ``stop_at``: a halving rung's budget (peft_core/halving.py): the state is saved to ``resume``
    after that epoch and training stops there; the schedule stays that of ``spec.epochs``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, spec, x.device)
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / spec.batch_size)
    hook, hp = get_method(spec.method).step_hook, get_method(spec.method).hparams(**spec.hparams)
    total_steps = spec.epochs * steps_per_epoch
    dtype = autocast_dtype(spec.precision)
    pace = Pace(model, spec.method, spec.pace.sigma, spec.pace.weight, spec.seed) if spec.pace else None
    fwd, prepare = _forward(model, spec, head)
    out = Outcome()
    step, first_epoch = 0, 0
    if resume is not None and resume.is_file():
        first_epoch, step, out.images = load_resume(resume, spec, model, opt, gen)
        log(f"resumed from {resume} at epoch {first_epoch + 1}")
    model.train()
    for epoch in range(first_epoch, spec.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(x.device)
        loss_sum = torch.zeros((), device=x.device)
        correct = torch.zeros((), device=x.device, dtype=torch.long)
        for start in range(0, n, spec.batch_size):
            idx = order[start : start + spec.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch, spec)
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                if pace is None:
                    logits = fwd(prepare(x[idx]))
                    loss = F.cross_entropy(logits, y[idx])
                else:  # two passes with independent noise on the adapter outputs (peft_core/pace.py)
                    loss, logits, _ = pace.loss(fwd, to_float(x[idx], spec.normalize), y[idx], step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hook is not None:  # e.g. AdaLoRA's rank budget; gradients are still in place
                hook.step(model, hp, step, total_steps)
            loss_sum += loss.detach() * idx.numel()
            correct += (logits.detach().argmax(1) == y[idx]).sum()
            step += 1
        out.images += n
        epoch_loss = float(loss_sum) / n  # one host sync per epoch
        out.final_loss = epoch_loss
        out.final_accuracy = int(correct) / n
        log(f"epoch {epoch + 1}/{spec.epochs} loss {epoch_loss:.4f} {n / (time.perf_counter() - t0):.0f} img/s")
        if not math.isfinite(epoch_loss):
            out.status, out.diverged_epoch = "diverged", epoch + 1
            break
        preempted = flag is not None and flag["hit"]
        if (preempted or epoch + 1 == stop_at) and resume is not None and epoch + 1 < spec.epochs:
            save_resume(resume, spec, model, opt, gen, epoch + 1, step, out.images)
            if not preempted:
                log(f"budget of {stop_at} epochs reached: state saved to {resume}")
                break
            log(f"preempted: state saved to {resume} after epoch {epoch + 1}")
            raise Preempted(str(resume))
    if pace is not None:
        pace.remove()
    return out


def _forward(model, spec: CellSpec, head: torch.nn.Module | None):
    """(module to call, what turns a slice of ``x`` into its input): the model on images, or the head alone."""
    if head is None:
        return forward_fn(model, spec), lambda u: to_float(u, spec.normalize)
    return forward_fn(head, spec), lambda f: f


@torch.inference_mode()
def evaluate(model, spec: CellSpec, x: torch.Tensor, head: torch.nn.Module | None = None) -> torch.Tensor:
    model.eval()
    dtype = autocast_dtype(spec.precision)
    fwd, prepare = _forward(model, spec, head)
    chunks = []
    for start in range(0, x.shape[0], spec.eval_batch_size):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            chunks.append(fwd(prepare(x[start : start + spec.eval_batch_size])).float())
    return torch.cat(chunks)


def run_cell(
    spec: CellSpec,
    train_data: str | Path,
    eval_data: str | Path,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    threads: int = 1,
    device: str = "auto",
    log=None,
    code: str | None = None,
    inputs: dict | None = None,
    prestep: str | Path | None = None,
    features: tuple[str | Path, str | Path] | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate one cell; write spec.json, predictions.parquet, metrics.json.

    ``inputs`` (peft_core/fingerprint.cell_inputs) is recorded in metrics.json: the
    content fingerprints a later run compares before reusing this cell.
    ``prestep``: the method's data-dependent result (peft_core/prestep.py), for the
    methods that have one; it is copied into the cell directory.
    ``features``: the cached head inputs of the train and eval splits (peft_core/features.py),
    for a head-only method; used when the built model allows it, else the images are read.
    ``stop_at`` < ``spec.epochs``: a halving rung; only the validation metrics are returned and
    the state stays in ``resume.pt`` for the next rung (peft_core/halving.py).
    """
    if log is None and sys.stderr.isatty():
        from .progress import rich_epoch_log

        with rich_epoch_log(spec) as live:
            return run_cell(spec, train_data, eval_data, checkpoint, out_dir, threads, device, live, code, inputs,
                            prestep, features, stop_at)  # fmt: skip
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    if spec.pace is not None:
        check_method(spec.method)  # before any data is read
    state = state_for_cell(spec, prestep)
    dev = setup_process(threads, device)
    torch.manual_seed(spec.seed)
    if features is None:
        train_split, eval_split = load_split(train_data, dev), load_split(eval_data, dev)
    model = build_model(spec, checkpoint, dev, state)  # the same draws with or without cached features
    head = None
    if features is not None:  # the head's cached inputs, or the images where this model needs them
        from .features import cell_splits

        train_split, eval_split, head = cell_splits(spec, model, features, train_data, eval_data, checkpoint,
                                                    inputs, dev, log)  # fmt: skip
    if prestep is not None:
        keep_in_cell(prestep, out_dir)
    t_loaded = time.perf_counter()

    resume = out_dir / RESUME
    with preemption_flag() as flag:
        outcome = train(model, spec, train_split.images, train_split.labels, log, resume, flag, head, stop_at)
    t_trained = time.perf_counter()
    return write_cell(spec, model, outcome, eval_split, dev, out_dir, (t_start, t_loaded, t_trained), threads, log,
                      code, inputs, head, n_train=int(len(train_split.labels)), stop_at=stop_at)  # fmt: skip


def setup_process(threads: int, device: str) -> torch.device:
    """Torch threads and the device of this process (TF32 for fp32 leftovers on CUDA)."""
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast (this process only)
        torch.backends.cudnn.allow_tf32 = True
    return dev


def write_cell(spec: CellSpec, model, outcome: Outcome, eval_split, dev: torch.device, out_dir: Path,
               times: tuple[float, float, float], threads: int, log, code: str | None, inputs: dict | None,
               head: torch.nn.Module | None = None, extra: dict | None = None, n_train: int = 0,
               stop_at: int | None = None) -> dict[str, Any]:
    """Evaluate a trained cell and write its files; ``times``: (start, loaded, trained).

    ``extra``: fields added to metrics.json (the batched path's ``batched``, peft_core/batched.py).
    ``n_train``: the training images; ``stop_at`` < ``spec.epochs``: a halving rung's budget, for
    which only the validation metrics are returned (nothing is written; see :func:`run_cell`).
    """
    import pandas as pd

    t_start, t_loaded, t_trained = times
    resume = out_dir / RESUME
    if outcome.status == "ok":
        logits = evaluate(model, spec, eval_split.images, head).cpu()
        if not torch.isfinite(logits).all():
            outcome.status = "diverged"
    t_eval = time.perf_counter()

    labels = eval_split.labels.cpu()
    accuracy = float((logits.argmax(1) == labels).float().mean()) if outcome.status == "ok" else float("nan")
    trainable = count_trainable(model)
    if stop_at is not None and stop_at < spec.epochs:
        return {"cell": spec.cell_id, "status": outcome.status, "accuracy": accuracy, "eval_split": spec.eval_split,
                "trainable_params": trainable, "n_train": n_train, "epochs": stop_at}  # fmt: skip
    if outcome.status == "ok":
        pred = logits.argmax(1)
        write_parquet(
            out_dir / PREDICTIONS,
            pd.DataFrame(
                {
                    "index": range(len(labels)),
                    "label": labels.numpy(),
                    "pred": pred.numpy(),
                    "logits": list(logits.numpy()),
                }
            ),
        )
    else:
        write_parquet(out_dir / PREDICTIONS, pd.DataFrame({"index": [], "label": [], "pred": [], "logits": []}))

    train_time = t_trained - t_loaded
    metrics = {
        "cell": spec.cell_id,
        "dataset": spec.dataset,
        "method": spec.method,
        "status": outcome.status,
        "diverged_epoch": outcome.diverged_epoch,
        "train_split": spec.train_split,
        "eval_split": spec.eval_split,
        "accuracy": accuracy,
        "n_eval": int(len(labels)),
        "n_train": n_train,
        "final_train_loss": outcome.final_loss,
        "final_train_accuracy": outcome.final_accuracy,
        "trainable_params": trainable,
        "head_params": count_head(model),
        "params_excl_head": count_backbone(model),  # frozen backbone + the method's modules
        "ppt": ppt(accuracy, trainable) if outcome.status == "ok" else float("nan"),
        "trainable_tensors": trainable_names(model),
        "images_per_s": outcome.images / train_time if train_time > 0 else float("nan"),
        "peak_memory_mb": peak_memory_mb(dev),
        "wall_time_s": time.perf_counter() - t_start,
        "load_s": t_loaded - t_start,
        "train_s": train_time,
        "eval_s": t_eval - t_trained,
        "device": str(dev),
        "precision": spec.precision,
        "schedule": spec.schedule,
        "init": spec.init,
        "compiled": spec.compile,
        "feature_cache": head is not None,  # trained on cached frozen features (peft_core/features.py)
        "batched": False,  # trained alone (True: with its pack's other cells as one model, peft_core/batched.py)
        "threads": threads,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "torch": torch.__version__,
        "peft_core": __version__,
        "code": code,  # checksum of the engine + method sources it ran (packs reuse cells by it)
        "inputs": inputs,  # sha256 of the data caches and checkpoint it read (packs reuse cells by them)
        **(extra or {}),
    }
    write_safetensors(
        out_dir / WEIGHTS,
        {n: p.detach().cpu().contiguous() for n, p in trained_state(model).items()},
        metadata={"spec": spec.canonical_json()},
    )
    write_json(out_dir / SPEC, spec.model_dump(mode="json"))
    write_json(out_dir / METRICS, metrics)
    resume.unlink(missing_ok=True)
    log(f"{spec.dataset}/{spec.method}/{spec.cell_id}: {outcome.status} {spec.eval_split} acc {accuracy:.4f}")
    return metrics

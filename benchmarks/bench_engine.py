"""Train-step throughput and peak memory: our engine path vs a naive one, per method.

ours:  ``peft_core.train.train`` itself: the uint8 image cache on the device,
       batches sliced there, timm's fused SDPA attention, bf16 autocast on
       CUDA, the loss read once per epoch (no per-step host sync).
naive: the same model and optimiser in fp32 eager, timm's fused attention
       off (``fused_attn = False``: explicit softmax(QK^T)V), every batch
       decoded from PNG files on disk with PIL and resized, moved to the
       device each step, and ``loss.item()`` every step (as a per-step log does).

Each (method, mode) runs in a fresh spawned process, so peak memory (CUDA:
``max_memory_allocated``; CPU: the process's peak RSS) is its own and one run
does not warm caches for the next. Random weights; a fixed random batch of
labels over 100 classes. On CUDA, FLOPs per training image are measured with
``torch.utils.flop_counter`` over one forward+backward and MFU is given
against the device's dense bf16 peak (``--peak-tflops`` to override).

Example (GPU):  python benchmarks/bench_engine.py --steps 30 --batch-size 64
Example (CPU):  python benchmarks/bench_engine.py --model vit_small_patch16_224 --steps 3 --batch-size 8
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

NUM_CLASSES = 100
# ours: the engine as configured (--precision); ours_compiled: the same under torch.compile;
# naive: fp32 eager, unfused attention, PNG decoding every step, a host sync every step.
MODES = ("ours", "ours_compiled", "naive")
# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets), matched against the device name in order.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("A10", 125.0), ("L4", 121.0))  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One measurement: everything a spawned child needs (picklable)."""

    method: str
    mode: str  # one of MODES
    model: str
    img_size: int
    batch_size: int
    steps: int
    warmup: int
    device: str
    threads: int | None
    png_dir: str
    flops: bool
    precision: str = "auto"


@dataclass(frozen=True)
class Result:
    images_per_s: float
    peak_mb: float
    trainable: int
    flops_per_image: float | None
    device_name: str


def cell_spec(job: Job, epochs: int = 1):
    """A CellSpec for the engine (method defaults, protocol optimiser settings, no warm-up epochs)."""
    from peft_core.cells import BackboneSpec, CellSpec
    from peft_core.methods import get_method

    return CellSpec(
        dataset="bench", num_classes=NUM_CLASSES, train_split="train800", eval_split="val200",
        image_size=job.img_size, normalize="none",
        backbone=BackboneSpec(model=job.model, checkpoint="-", kwargs={"img_size": job.img_size}),
        method=job.method, hparams=get_method(job.method).hparams().model_dump(mode="json"), lr=1e-3,
        weight_decay=1e-4, epochs=epochs, warmup_epochs=0, warmup_lr_init=1e-6, lr_min=1e-5,
        batch_size=job.batch_size, eval_batch_size=job.batch_size, drop_path=0.1, seed=0,
        precision=job.precision if job.mode != "naive" else "fp32", compile=job.mode == "ours_compiled",
    )  # fmt: skip


def measure(job: Job) -> Result:
    """Runs in a spawned child: build the model, warm up, time ``job.steps`` training steps."""
    import torch

    from peft_core.methods._common import count_trainable
    from peft_core.train import build_model, pick_device

    if job.threads:
        torch.set_num_threads(job.threads)
    dev = pick_device(job.device)
    torch.manual_seed(0)
    spec = cell_spec(job)
    model = build_model(spec, None, dev)
    run = run_naive if job.mode == "naive" else run_ours
    flops = count_flops(model, job, dev) if job.flops else None
    seconds = run(model, spec, job, dev)
    return Result(
        images_per_s=job.steps * job.batch_size / seconds,
        peak_mb=peak_mb(dev),
        trainable=count_trainable(model, exclude_head=True),
        flops_per_image=flops,
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
    )


def run_ours(model, spec, job: Job, dev) -> float:
    """Seconds for ``job.steps`` steps of the engine's own ``train`` (after a warm-up call)."""
    import torch

    from peft_core.train import train

    n = job.batch_size * max(job.steps, job.warmup)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, job.img_size, job.img_size), dtype=torch.uint8, generator=g).to(dev)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(dev)
    if job.warmup:
        train(model, spec, x[: job.warmup * job.batch_size], y[: job.warmup * job.batch_size], _quiet)
    reset_peak(dev)
    t0 = time.perf_counter()
    train(model, spec, x[: job.steps * job.batch_size], y[: job.steps * job.batch_size], _quiet)  # syncs at the end
    return time.perf_counter() - t0


def _quiet(msg: str) -> None:
    """The engine's per-epoch log line, dropped."""


def run_naive(model, spec, job: Job, dev) -> float:
    """Seconds for ``job.steps`` fp32 eager steps, decoding PNGs every step and syncing every step."""
    import torch
    import torch.nn.functional as F

    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    files = sorted(Path(job.png_dir).glob("*.png"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    g = torch.Generator().manual_seed(0)
    model.train()

    def step(i: int) -> None:
        batch = [files[(i * job.batch_size + k) % len(files)] for k in range(job.batch_size)]
        x = torch.stack([decode(f, job.img_size) for f in batch]).to(dev)
        y = torch.randint(0, NUM_CLASSES, (job.batch_size,), generator=g).to(dev)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # per-step host sync, as a per-step log line does

    for i in range(job.warmup):
        step(i)
    reset_peak(dev)
    t0 = time.perf_counter()
    for i in range(job.steps):
        step(job.warmup + i)
    return time.perf_counter() - t0


def decode(path: Path, size: int):
    """PNG -> float [3, size, size] in [0, 1]: what a per-step PIL data loader does."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(255.0)


def count_flops(model, job: Job, dev) -> float:
    """FLOPs of one forward+backward per image (the optimiser step is not counted)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(job.batch_size, 3, job.img_size, job.img_size, device=dev)
    y = torch.zeros(job.batch_size, dtype=torch.long, device=dev)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / job.batch_size


def reset_peak(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mb(dev) -> float:
    """CUDA: peak allocated during the timed steps. CPU: the child's peak RSS (whole process)."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_pngs(out: Path, count: int, size: int) -> None:
    """Smooth random images (upsampled noise compresses like photos, unlike raw noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(out / f"{i:05d}.png")


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((tf for key, tf in PEAK_TFLOPS if key in device_name), None)


def run_child(job: Job) -> Result:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure, job).result()


def table(rows: list[tuple[str, dict[str, Result]]], modes: list[str], peak: float | None) -> str:
    """Markdown table: one row per method; img/s and peak memory per mode, ratios against naive."""
    fast = [m for m in modes if m != "naive"]
    cols = ["method", "trainable"] + [f"{m} img/s" for m in modes]
    cols += [f"{m} / naive" for m in fast] if "naive" in modes else []
    cols += [f"{m} peak MB" for m in modes]
    if peak:
        cols += ["GFLOP/img"] + [f"{m} MFU" for m in modes]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method, res in rows:
        first = res[modes[0]]
        cells = [method, f"{first.trainable:,}"] + [f"{res[m].images_per_s:.1f}" for m in modes]
        if "naive" in modes:
            cells += [f"{res[m].images_per_s / res['naive'].images_per_s:.2f}x" for m in fast]
        cells += [f"{res[m].peak_mb:,.0f}" for m in modes]
        if peak:
            f = first.flops_per_image or float("nan")
            cells += [f"{f / 1e9:.1f}"] + [_mfu(f, res[m], peak) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mfu(flops_per_image: float, r: Result, peak_tf: float) -> str:
    return f"{100 * flops_per_image * r.images_per_s / (peak_tf * 1e12):.1f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--methods", default="full,linear,lora,adapter,vpt_deep,ssf,fact_tt")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--src-size", type=int, default=256, help="side of the PNG files the naive mode decodes")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak for MFU")
    p.add_argument("--modes", default="ours,naive", help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="of the ours modes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import timm
    import torch

    a = parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if unknown := sorted(set(modes) - set(MODES)):
        raise SystemExit(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    on_cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_png_") as png_dir:
        write_pngs(Path(png_dir), min(a.batch_size * (a.steps + a.warmup), 512), a.src_size)
        for method in methods:
            results = {}
            for mode in modes:
                job = Job(method, mode, a.model, a.img_size, a.batch_size, a.steps, a.warmup, a.device,
                          a.threads, png_dir, flops=on_cuda and mode == modes[0], precision=a.precision)  # fmt: skip
                results[mode] = r = run_child(job)
                print(f"{method:<10} {mode:<14} {r.images_per_s:8.1f} img/s  peak {r.peak_mb:,.0f} MB",
                      file=sys.stderr, flush=True)  # fmt: skip
            rows.append((method, results))
    device_name = rows[0][1][modes[0]].device_name if rows else "?"
    peak = peak_tflops(device_name, a.peak_tflops) if on_cuda else None
    print(f"command: python benchmarks/bench_engine.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"device: {device_name}; torch {torch.__version__}, timm {timm.__version__}; threads/child: "
          f"{a.threads or 'default'}; model {a.model} at {a.img_size}px, batch {a.batch_size}, "
          f"{a.steps} timed steps after {a.warmup} warm-up; ours precision {a.precision}; "
          f"naive decodes {a.src_size}px PNGs"
          + (f"; MFU vs {peak:.0f} TFLOP/s bf16 dense" if peak else ""))  # fmt: skip
    print()
    print(table(rows, modes, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batched packs vs sequential cells: training images/s of one C-cell pack, in one process.

sequential: ``peft_core.train.train`` on each cell's model, one after another
            (what ``train-pack`` does by default);
batched:    ``peft_core.batched.train_batched`` on the same cells as one vmapped
            model (``compute.train.batched_packs: true``).

Both run the same cells (the lr x weight-decay grid of one method configuration,
random weights, drop-path 0 and the method's dropout 0, as the batched path
requires), the same number of epochs over the same random uint8 images; one
warm-up epoch of each mode is run first and not timed. Images/s counts every
cell's images: C * n * epochs / seconds. Timing only: evaluation, model builds
and file writes are not included (they are the same in both modes). The two
modes are timed ``--repeat`` times, interleaved, and the medians reported.

Example (CPU, demo-sized):  python benchmarks/bench_batched_pack.py --model vit_tiny_patch16_224 \\
    --kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}' --images 256
Example (CPU, ViT-Ti/16 224 px):  python benchmarks/bench_batched_pack.py --images 32 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_core.batched import train_batched  # noqa: E402
from peft_core.cells import BackboneSpec, CellSpec  # noqa: E402
from peft_core.train import build_model, pick_device, train  # noqa: E402

NUM_CLASSES = 100
GRID = ((1e-3, 1e-4), (1e-3, 1e-3), (1e-2, 1e-4), (1e-2, 1e-3))
HPARAMS = {"lora": {"rank": 8, "dropout": 0.0}, "bitfit": {}, "linear": {}}


def specs(a) -> list[CellSpec]:
    kwargs = json.loads(a.kwargs)
    size = kwargs.get("img_size", 224)
    return [
        CellSpec(
            dataset="bench", num_classes=NUM_CLASSES, train_split="train800", eval_split="val200", image_size=size,
            normalize="none", backbone=BackboneSpec(model=a.model, checkpoint="-", kwargs=kwargs),
            method=a.method, hparams=HPARAMS[a.method], lr=lr, weight_decay=wd, epochs=a.epochs, warmup_epochs=0,
            warmup_lr_init=1e-6, lr_min=1e-5, batch_size=a.batch_size, eval_batch_size=a.batch_size,
            drop_path=0.0, seed=0, interpolation="bicubic", schedule="per_step", init="intended",
            precision=a.precision,
        )  # fmt: skip
        for lr, wd in GRID[: a.cells]
    ]


def models(cells: list[CellSpec], dev) -> list[torch.nn.Module]:
    out = []
    for spec in cells:
        torch.manual_seed(spec.seed)
        out.append(build_model(spec, None, dev))
    return out


def data(spec: CellSpec, n: int, dev):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, spec.image_size, spec.image_size), dtype=torch.uint8, generator=g)
    return x.to(dev), torch.randint(0, NUM_CLASSES, (n,), generator=g).to(dev)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sequential_runner(cells, x, y, dev):
    """A timed run of every cell alone, one after another (models built and warmed up once)."""
    ms = models(cells, dev)
    for m, s in zip(ms, cells):  # warm-up epoch
        train(m, s.model_copy(update={"epochs": 1}), x, y, _quiet)

    def run() -> float:
        sync(dev)
        t0 = time.perf_counter()
        for m, s in zip(ms, cells):
            train(m, s, x, y, _quiet)
        sync(dev)
        return time.perf_counter() - t0

    return run


def batched_runner(cells, x, y, dev, tmp: Path):
    """A timed run of the cells as one batch (models built and warmed up once)."""
    ms = models(cells, dev)
    resumes = [tmp / f"{i}.pt" for i in range(len(cells))]
    warm = [s.model_copy(update={"epochs": 1}) for s in cells]
    train_batched(ms, warm, x, y, _quiet, resumes, None, lambda c, o: None)

    def run() -> float:
        sync(dev)
        t0 = time.perf_counter()
        train_batched(ms, cells, x, y, _quiet, resumes, None, lambda c, o: None)
        sync(dev)
        return time.perf_counter() - t0

    return run


def _quiet(msg: str) -> None:
    """The engines' per-epoch log lines, dropped."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--kwargs", default="{}", help="timm model kwargs as JSON (architecture overrides)")
    p.add_argument("--method", default="lora", choices=sorted(HPARAMS))
    p.add_argument("--cells", type=int, default=4, choices=range(1, len(GRID) + 1))
    p.add_argument("--images", type=int, default=64, help="training images per cell and epoch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each mode, interleaved")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = pick_device(a.device)
    cells = specs(a)
    x, y = data(cells[0], a.images, dev)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"sequential": sequential_runner(cells, x, y, dev), "batched": batched_runner(cells, x, y, dev, Path(tmp))}
        seconds = {mode: [] for mode in runs}
        for _ in range(a.repeat):  # interleaved, so a change of load hits both modes
            for mode, run in runs.items():
                seconds[mode].append(run())
    images = len(cells) * a.images * a.epochs
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({a.threads} threads)"
    print(f"{a.model} {a.kwargs} {a.method}, {len(cells)} cells x {a.images} images x {a.epochs} epochs, "
          f"batch {a.batch_size}, {a.precision}, {name}, median of {a.repeat}")  # fmt: skip
    print("| mode | images/s | seconds |\n|---|---:|---:|")
    for mode, ts in seconds.items():
        print(f"| {mode} | {images / statistics.median(ts):.1f} | {statistics.median(ts):.2f} |")
    ratios = sorted(s / b for s, b in zip(seconds["sequential"], seconds["batched"]))
    print(f"batched / sequential: {statistics.median(seconds['sequential']) / statistics.median(seconds['batched']):.2f}x"
          f" (per repeat {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

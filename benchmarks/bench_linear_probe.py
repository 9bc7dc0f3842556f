"""Linear-probe cells on images vs on cached frozen features (peft_core/features.py).

Runs the demo study's linear-probe cells (config/demo.yaml: its data sets, its
pre-trained demo backbone, ``linear: {norm: batchnorm}``, 6 epochs, batch 32)
twice each through ``peft_core.train.run_cell``: once on the images (the
backbone's forward pass in every step) and once on the features the
``extract_features`` rule caches (the head alone). Prints each cell's wall time
(``metrics.json`` ``wall_time_s``: load, model build, training, evaluation,
writing the outputs), training images/s, the ratio, the one-off extraction
time and the ratio with the extraction shared by the cells that read it, and
checks that both paths give the same accuracy and the same head tensors.

The demo data and backbone are made as the workflow makes them
(``peft_core.demo.write_vtab_folder``, ``peft_core.pretrain.pretrain_demo``, about
a minute on 2 cores), into ``--work``, or taken from there when present.
``--model`` (with ``--kwargs``, ``--image-size``) swaps the demo backbone for a
random-weight timm model on the same images resized, to see the ratio at a
real backbone's cost; ``--cells N`` keeps the first N cells of each data set.

Example:  python benchmarks/bench_linear_probe.py --threads 1
Example:  python benchmarks/bench_linear_probe.py --datasets digits --model vit_tiny_patch16_224 --image-size 224 --cells 1 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(study, work: Path, datasets: list[str], threads: int) -> dict:
    """Demo data caches and the demo checkpoint under ``work`` (made once)."""
    from peft_core.data import build_cache
    from peft_core.demo import write_vtab_folder
    from peft_core.pretrain import pretrain_demo

    cfg = study.cfg
    ckpt = work / f"backbone_{cfg.backbone.model}_{cfg.data.image_size}.safetensors"
    if cfg.backbone.pretrain is None and not ckpt.is_file():  # --model: random weights
        from safetensors.torch import save_file

        from peft_core.backbones import create

        torch_state = create(cfg.backbone.model, 1, 0.0, **cfg.backbone.kwargs).state_dict()
        save_file({k: v.contiguous() for k, v in torch_state.items() if not k.startswith("head.")}, str(ckpt))
    if not ckpt.is_file():
        t0 = time.perf_counter()
        pretrain_demo(cfg.backbone, ckpt, threads=threads, log=lambda _m: None)
        print(f"pre-trained the demo backbone in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    caches = {}
    for name in datasets:
        if not (work / "vtab" / name / "test.txt").is_file():
            write_vtab_folder(name, work / "vtab")
        d = cfg.data
        for split in (d.tune_train, d.tune_eval, d.final_train, d.final_eval):
            out = work / "cache" / name / f"{split}_{d.image_size}px.safetensors"
            if not out.is_file():
                build_cache(work / "vtab", name, split, d.image_size, cfg.datasets[name].num_classes, out,
                            interpolation=d.interpolation)  # fmt: skip
            caches[(name, split)] = out
    return {"checkpoint": ckpt, "caches": caches}


def bench(args) -> None:
    import torch
    from safetensors.torch import load_file

    from peft_core.config import load_study
    from peft_core.features import extract, feature_spec, plan_reason
    from peft_core.fingerprint import cell_inputs
    from peft_core.train import run_cell

    import yaml

    torch.set_num_threads(args.threads)
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    if args.model:
        raw["backbone"] = {"model": args.model, "kwargs": json.loads(args.kwargs), "checkpoint": "random.safetensors"}
        raw["data"]["image_size"] = args.image_size
    study = load_study(raw)
    datasets = args.datasets or study.dataset_names()
    work = Path(args.work)
    files = prepare(study, work, datasets, args.threads)
    ckpt = files["checkpoint"]
    rows, quiet = [], (lambda _m: None)
    for name in datasets:
        cells = study.tuning_cells(name, "linear")
        finals = [study.final_cell(cells[0], seed) for seed in study.cfg.train.final_seeds]
        stages = [("tune", cells), ("final", finals)]
        if args.cells:
            stages = [(stage, group[: max(0, args.cells - i * len(cells))]) for i, (stage, group) in enumerate(stages)]
        for stage, group in [(s, g) for s, g in stages if g]:
            s0 = group[0]
            assert plan_reason(s0, study.cfg.train.feature_cache) is None, plan_reason(s0)
            train_data, eval_data = files["caches"][(name, s0.train_split)], files["caches"][(name, s0.eval_split)]
            t0 = time.perf_counter()
            feats = []
            for split, data in ((s0.train_split, train_data), (s0.eval_split, eval_data)):
                out = work / "features" / name / f"{split}_{feature_spec(s0, split).key}.safetensors"
                extract(feature_spec(s0, split), data, ckpt, out, args.threads, "cpu", log=quiet)
                feats.append(out)
            extract_s = time.perf_counter() - t0
            inputs = cell_inputs(s0.train_split, train_data, s0.eval_split, eval_data, ckpt, features=tuple(feats))
            for spec in group:
                runs = {"images": [], "features": []}
                for rep in range(args.repeat):
                    for path, given in (("images", None), ("features", tuple(feats))):
                        out = work / "cells" / path / spec.cell_id
                        m = run_cell(spec, train_data, eval_data, ckpt, out, args.threads, "cpu", quiet,
                                     inputs=inputs, features=given)  # fmt: skip
                        runs[path].append(m)
                a, b = runs["images"][-1], runs["features"][-1]
                ta = load_file(work / "cells" / "images" / spec.cell_id / "trainable.safetensors")
                tb = load_file(work / "cells" / "features" / spec.cell_id / "trainable.safetensors")
                same = a["accuracy"] == b["accuracy"] and ta.keys() == tb.keys() and all(
                    torch.equal(ta[k], tb[k]) for k in ta)  # fmt: skip
                rows.append({
                    "cell": f"{name}/{stage}/{spec.cell_id}", "lr": spec.lr, "acc": a["accuracy"], "same": same,
                    "wall_images": statistics.median(r["wall_time_s"] for r in runs["images"]),
                    "wall_features": statistics.median(r["wall_time_s"] for r in runs["features"]),
                    "ips_images": statistics.median(r["images_per_s"] for r in runs["images"]),
                    "ips_features": statistics.median(r["images_per_s"] for r in runs["features"]),
                    "min_images": min(r["wall_time_s"] for r in runs["images"]),
                    "min_features": min(r["wall_time_s"] for r in runs["features"]),
                    "extract_s": extract_s, "sharing": len(group),
                })  # fmt: skip
    report(rows, args)


def report(rows: list[dict], args) -> None:
    import timm
    import torch

    model = args.model or "demo backbone (config/demo.yaml)"
    print(f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}, timm {timm.__version__}; threads {args.threads}; "
          f"median of {args.repeat} run(s) per path; {model}")  # fmt: skip
    print(f"command: python benchmarks/bench_linear_probe.py {shlex.join(sys.argv[1:])}")
    print()
    print("| cell | lr | eval acc | same result | wall images (s) | wall features (s) | ratio | "
          "train img/s images | train img/s features | extraction (s, shared by) | ratio incl. extraction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        amortised = r["wall_features"] + r["extract_s"] / r["sharing"]
        print(f"| {r['cell']} | {r['lr']:g} | {r['acc']:.4f} | {'yes' if r['same'] else 'NO'} | "
              f"{r['wall_images']:.3f} | {r['wall_features']:.3f} | {r['wall_images'] / r['wall_features']:.1f}x | "
              f"{r['ips_images']:,.0f} | {r['ips_features']:,.0f} | {r['extract_s']:.2f} ({r['sharing']}) | "
              f"{r['wall_images'] / amortised:.1f}x |")  # fmt: skip
    total_a = sum(r["wall_images"] for r in rows)
    total_b = sum(r["wall_features"] for r in rows)
    extraction = sum(r["extract_s"] / r["sharing"] for r in rows)
    print()
    print(f"all cells: {total_a:.2f} s on images, {total_b:.2f} s on features ({total_a / total_b:.1f}x); "
          f"with the extraction: {total_b + extraction:.2f} s ({total_a / (total_b + extraction):.1f}x); "
          f"same result in {sum(r['same'] for r in rows)}/{len(rows)} cells")  # fmt: skip
    best_a, best_b = sum(r["min_images"] for r in rows), sum(r["min_features"] for r in rows)
    print(f"fastest run of each cell: {best_a:.2f} s on images, {best_b:.2f} s on features ({best_a / best_b:.1f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", help="demo data sets (default: all of config/demo.yaml)")
    p.add_argument("--work", default="/tmp/bench_linear_probe", help="demo data, checkpoint and cells go here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="runs per cell and path (the median is reported)")
    p.add_argument("--cells", type=int, help="only the first N linear cells of each data set (tuning, then final)")
    p.add_argument("--model", help="a random-weight timm backbone instead of the demo's")
    p.add_argument("--kwargs", default="{}", help="with --model: timm.create_model arguments (JSON)")
    p.add_argument("--image-size", type=int, default=224, help="with --model: the images are resized to this")
    bench(p.parse_args())


if __name__ == "__main__":
    main()

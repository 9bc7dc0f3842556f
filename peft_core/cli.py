"""``peft-core``: thin subcommands over the core package.

Every input error is printed as one line (``peft-core: error: <field or path>:
<what is wrong>``) with exit status 2, before any model is built.
Heavy imports (torch, timm) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

from .commands import data, report, tools, train
from .errors import InputError
from .preempt import preemption_flag












































def _cell_args(s) -> None:
    s.add_argument("--code-stamp", help="code-stamp file; its checksum is recorded in metrics.json")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])




























def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-core", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("validate", help="validate a study config")
    s.add_argument("config")
    s.set_defaults(fn=tools.cmd_validate)

    s = sub.add_parser("schema", help="export the study config JSON schema")
    s.add_argument("--out")
    s.set_defaults(fn=tools.cmd_schema)

    s = sub.add_parser("make-demo-data", help="write one embedded demo data set in VTAB-1k folder format")
    s.add_argument("--root", required=True)
    s.add_argument("--dataset", required=True)
    s.set_defaults(fn=data.cmd_make_demo_data)

    s = sub.add_parser("pretrain-demo", help="pre-train the demo backbone on the upstream task")
    s.add_argument("--backbone-json", required=True, help="the config's backbone section as JSON")
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(fn=data.cmd_pretrain_demo)

    s = sub.add_parser("cache", help="decode one split into a uint8 tensor cache")
    for flag in ("--root", "--dataset", "--split", "--out"):
        s.add_argument(flag, required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--num-classes", type=int, required=True)
    s.add_argument("--layout", default="vtab", choices=["vtab", "imagefolder", "csv"], help="see peft_core/data.py")
    # the names of config.INTERPOLATIONS, spelled out: importing config (pydantic) here would
    # slow every command's start, the fork-server client's included
    s.add_argument("--interpolation", default="bicubic", help="PIL resize filter (bicubic: the reference protocol's)",
                   choices=["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"])  # fmt: skip
    s.add_argument("--disjoint-from", action="append", default=[], metavar="SPLIT",
                   help="refuse if SPLIT of the same data set shares an image, by path or bytes (repeatable)")  # fmt: skip
    s.set_defaults(fn=data.cmd_cache)

    s = sub.add_parser("prepare-vtab", help="check a processed VTAB-1k root (splits, sizes, labels, image files), "
                       "or build one data set of it from raw sources first (--source-format)")  # fmt: skip
    s.add_argument("--root", help="the processed VTAB-1k root to check")
    s.add_argument("--datasets", nargs="+", help="default: all 19")
    s.add_argument("--full", action="store_true", help="check every image file, not a sample per split")
    # the names of vtab_build.SOURCE_FORMATS (a test keeps them in step): importing it would load numpy
    s.add_argument("--source-format", choices=["tfds", "cifar-binary", "svhn-mat", "dtd-folder", "flowers102-folder",
                                               "pets-folder", "eurosat-folder", "resisc45-folder", "caltech101-folder",
                                               "sun397-folder", "dsprites-npz", "smallnorb-mat"],
                   help="build mode (peft_core/vtab_build.py): tfds = a TFDS prepared directory (the official "
                        "VTAB-1k images); the others = one data set's original archive, extracted "
                        "(peft_core/vtab_archives.py, vtab_arrays.py and vtab_scenes.py give the layouts; "
                        "VTAB-1k-style splits)")  # fmt: skip
    s.add_argument("--source", help="build mode: the TFDS data_dir (or version folder), or the extracted archive")
    s.add_argument("--dataset", help="build mode: the VTAB-1k data set to write (cifar100, clevr_count, ...)")
    s.add_argument("--out", help="build mode: writes <out>/<dataset>/ (split files, images, manifest.json), then checks it")
    s.add_argument("--image-encoding", default="png", choices=["png", "source"],
                   help="build mode: png = decoded pixels as PNG (default); source = each TFDS record's or "
                        "image file's own encoded bytes, unchanged (tfds and the *-folder formats; far smaller "
                        "for the JPEG sets)")  # fmt: skip
    s.set_defaults(fn=data.cmd_prepare_vtab)

    s = sub.add_parser("prepare-manyshot", help="many-shot subsets by training-set size (stratified, nested, seeded)")
    s.add_argument("--source", required=True, help="folder holding <dataset>/ with the full train and test splits")
    s.add_argument("--dataset", required=True, help="the data set folder under --source (cifar100, resisc45, ...)")
    s.add_argument("--num-classes", type=int, required=True)
    s.add_argument("--layout", default="csv", choices=["vtab", "imagefolder", "csv"], help="layout of the source")
    s.add_argument("--train-split", default="train")
    s.add_argument("--test-split", default="test")
    s.add_argument("--out", required=True, help="writes <out>/<name>_<size>/{train,val,trainval,test}.csv")
    s.add_argument("--sizes", help="comma-separated, e.g. 500,1k,full (default: the preset's)")
    s.add_argument("--val-fraction", type=float, help="validation share of each size (default: the preset's)")
    s.add_argument("--preset", help="preset name when --dataset is named otherwise (cifar100, resisc45, clevr_count)")
    s.add_argument("--name", help="prefix of the output folders (default: --dataset)")
    s.add_argument("--group", default="natural", choices=["natural", "specialized", "structured"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=data.cmd_prepare_manyshot)

    s = sub.add_parser("prepare-fgvc", help="an FGVC data set from its official archive + VPT's train/val/test JSON files")
    s.add_argument("--source", required=True, help="the extracted data set folder, holding train.json, val.json, test.json")
    s.add_argument("--dataset", required=True, choices=["cub200", "nabirds", "flowers", "stanford_dogs", "stanford_cars"])
    s.add_argument("--out", required=True, help="writes <out>/<dataset>/{train,val,trainval,test}.csv + manifest.json")
    s.set_defaults(fn=data.cmd_prepare_fgvc)

    s = sub.add_parser("train", help="train and evaluate one cell")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--spec", help="cell spec JSON file")
    g.add_argument("--spec-json", help="cell spec as a JSON string")
    s.add_argument("--train-data", required=True)
    s.add_argument("--eval-data", required=True)
    s.add_argument("--checkpoint")
    s.add_argument("--out", required=True, help="cell directory")
    s.add_argument("--prestep", nargs="+", help="the method's prestep result (`peft-core prestep`), for SCT, GPS, NOAH")
    s.add_argument("--features", nargs=2, metavar=("TRAIN", "EVAL"),
                   help="cached head inputs of the two splits (`peft-core features`), for head-only methods")  # fmt: skip
    _cell_args(s)
    s.set_defaults(fn=train.cmd_train)

    s = sub.add_parser(
        "train-pack", help="train a list of cells (a tuning pack, or the final runs of a selection), reusing finished ones"
    )
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--spec-json", nargs="+", help="cell specs as JSON strings, in order")
    g.add_argument("--selection", help="`select` output: train its chosen configuration's final runs")
    g.add_argument("--ranking", help="`rank-rung` output: train the configurations it promotes (with --slots)")
    s.add_argument("--slots", type=int, nargs=2, metavar=("FIRST", "END"), help="with --ranking: ranked positions")
    s.add_argument("--budget", type=int, help="a halving rung: train each cell up to this epoch (peft_core/halving.py)")
    s.add_argument("--final-seeds", type=int, nargs="+", help="with --selection: one final run per seed")
    s.add_argument("--final-train", help="with --selection: the final runs' training split")
    s.add_argument("--final-eval", help="with --selection: the final runs' evaluation split")
    s.add_argument("--train-data", required=True)
    s.add_argument("--eval-data", required=True)
    s.add_argument("--checkpoint")
    s.add_argument("--cells-root", required=True, help="cells go to <root>/<dataset>/<method>/<cell id>/")
    s.add_argument("--manifest", required=True, help="JSON written once every cell is done")
    s.add_argument("--prestep", nargs="+",
                   help="prestep results of the method (SCT, GPS, NOAH); each cell takes the one made for it")  # fmt: skip
    s.add_argument("--features", nargs=2, metavar=("TRAIN", "EVAL"),
                   help="cached head inputs of the two splits (`peft-core features`), for head-only methods")  # fmt: skip
    s.add_argument("--batched", action="store_true",
                   help="train the cells that allow it as one vmapped model (compute.train.batched_packs)")  # fmt: skip
    _cell_args(s)
    s.set_defaults(fn=train.cmd_train_pack)

    s = sub.add_parser("prestep", help="run a method's data-dependent step (SCT's channels, GPS's selection, NOAH's search)")
    s.add_argument("--spec-json", required=True, help="the prestep spec (peft_core/prestep.PrestepSpec) as JSON")
    s.add_argument("--train-data", required=True, help="cache of the split the step reads")
    s.add_argument("--eval-data", help="validation cache, for steps that select on it (NOAH's search)")
    s.add_argument("--checkpoint")
    s.add_argument("--out", required=True, help="result .safetensors (a .json summary is written beside it)")
    _cell_args(s)
    s.set_defaults(fn=train.cmd_prestep)

    s = sub.add_parser("features", help="cache the frozen backbone's head inputs of one split (linear probe)")
    s.add_argument("--spec-json", required=True, help="the feature spec (peft_core/features.FeatureSpec) as JSON")
    s.add_argument("--data", required=True, help="cache of the split")
    s.add_argument("--checkpoint")
    s.add_argument("--out", required=True, help="features .safetensors")
    _cell_args(s)
    s.set_defaults(fn=train.cmd_features)

    s = sub.add_parser("rank-rung", help="rank a halving rung's cells by validation accuracy (ties: cell id)")
    s.add_argument("--manifests", nargs="+", required=True, help="the rung's `train-pack --budget` manifests")
    s.add_argument("--eval-split", required=True)
    s.add_argument("--rung", type=int, required=True)
    s.add_argument("--previous", type=int, required=True, help="the previous rung's budget (0 for the first)")
    s.add_argument("--promote", type=int, required=True, help="the next rung's planned room: how many can continue")
    s.add_argument("--eta", type=int, help="noise-aware promotion: the top ceil(n / eta) continue at least")
    s.add_argument("--keep-within-se", type=float,
                   help="noise-aware promotion: also every configuration within this many standard errors of the best")
    s.add_argument("--eval-data", help="noise-aware promotion: the validation split's cache (its size)")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=report.cmd_rank_rung)

    s = sub.add_parser("select", help="choose a configuration by validation accuracy")
    s.add_argument("--cells", nargs="+", help="grid: tuning cell directories, in listed order")
    s.add_argument("--rankings", nargs="+", help="halving: every rung's `rank-rung` output (the last rung's cells compete)")
    s.add_argument("--eval-split", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=report.cmd_select)

    s = sub.add_parser("aggregate", help="one data set's cells -> a tidy parquet table")
    s.add_argument("--study", required=True)
    s.add_argument("--group", required=True)
    s.add_argument("--final-eval", required=True, help="split name that marks final runs")
    s.add_argument("--cells", nargs="*", default=[], help="cell directories (the tuning cells)")
    s.add_argument("--rankings", nargs="*", default=[], help="halving: the last rung's ranking per method")
    s.add_argument("--finals", nargs="*", default=[], help="final-run manifests of `train-pack --selection`")
    s.add_argument("--selections", nargs="*", default=[])
    s.add_argument("--out", required=True)
    s.set_defaults(fn=report.cmd_aggregate)

    s = sub.add_parser("report", help="results.parquet, summary.md/.csv and index.html")
    s.add_argument("--config", required=True)
    s.add_argument("--tables", nargs="+", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--results", help="results/<study>: the final runs' predictions (for confidence intervals and "
                   "paired tests) and the previous results table; without it those sections are left out")  # fmt: skip
    s.set_defaults(fn=report.cmd_report)

    s = sub.add_parser("ensembles", help="prediction diversity and ensembles of the methods (needs >= 2 methods)")
    s.add_argument("--study", required=True)
    s.add_argument("--tables", nargs="+", required=True, help="per-data-set tables from `aggregate`")
    s.add_argument("--selections", nargs="*", default=[], help="selection JSON files (the chosen tuning cells)")
    s.add_argument("--results", default=None, help="study results directory holding cells/ (default: results/<study>)")
    s.add_argument("--confident-q", type=float, default=0.2, help="fraction of most confident samples compared")
    s.add_argument("--out-dir", required=True)
    s.set_defaults(fn=report.cmd_ensembles)

    s = sub.add_parser("make-demo-shift", help="write a colour/background-shifted copy of a demo data set's test split")
    s.add_argument("--root", required=True, help="folder to hold <split>.txt and images/")
    s.add_argument("--dataset", required=True)
    s.add_argument("--split", default="test")
    s.set_defaults(fn=data.cmd_make_demo_shift)

    s = sub.add_parser("robustness", help="WiSE-FT along alpha of one data set's final runs on ID and shifted test sets")
    s.add_argument("--tables", nargs="+", required=True, help="the data set's table from `aggregate`")
    s.add_argument("--selections", nargs="*", default=[], help="its selection files (checked against the final runs)")
    s.add_argument("--results", required=True, help="study results directory holding cells/")
    s.add_argument("--plan", required=True, help="JSON: {alphas, sets: {name: {distribution, split, class_map}}}")
    s.add_argument("--eval", nargs="+", required=True, help="NAME=cache.pt for each set of the plan")
    s.add_argument("--checkpoint", default=None, help="pre-trained backbone (default: each cell's)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--out", required=True, help="output .parquet")
    s.set_defaults(fn=report.cmd_robustness)

    s = sub.add_parser("robustness-report", help="robustness.{md,html,parquet} from the per-data-set tables")
    s.add_argument("--study", required=True)
    s.add_argument("--tables", nargs="+", required=True)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(fn=report.cmd_robustness_report)

    s = sub.add_parser("zeroshot-head", help="CLIP zero-shot head from class names (needs the `clip` extra)")
    s.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
    s.add_argument("--checkpoint", required=True, help="local open_clip checkpoint of that architecture")
    s.add_argument("--classes", required=True, help="text file, one class name per line in label order")
    s.add_argument("--templates", nargs="+", default=None, help="prompt templates with {} (default: 'a photo of a {}.')")
    s.add_argument("--out", required=True, help="output .safetensors (key 'weight': classes x embed_dim)")
    s.set_defaults(fn=report.cmd_zeroshot_head)

    s = sub.add_parser("params", help="trainable-parameter count of a method on a timm model (random weights)")
    s.add_argument("--backbone", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--kwargs", action="append", metavar="KEY=VALUE", help="timm.create_model arguments")
    s.add_argument("--num-classes", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=tools.cmd_params)

    s = sub.add_parser("param-table", help="Markdown table of trainable parameters at the reference grids")
    s.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name")
    s.add_argument("--grids", default="config/method_grids", help="directory of <method>.yaml grids")
    s.add_argument("--out", default=None, help="output .md (default: stdout)")
    s.set_defaults(fn=tools.cmd_param_table)

    s = sub.add_parser("merge", help="fold a trained cell into a plain timm checkpoint")
    s.add_argument("--cell", required=True, help="cell directory (spec.json + trainable.safetensors)")
    s.add_argument("--checkpoint", default=None, help="backbone checkpoint (default: the one in spec.json)")
    s.add_argument("--out", required=True, help="output .safetensors")
    s.set_defaults(fn=report.cmd_merge)

    s = sub.add_parser("wise", help="WiSE-FT: accuracy along the pre-trained -> fine-tuned weight path")
    s.add_argument("--cell", required=True, help="a finished cell of a mergeable method")
    s.add_argument("--eval", nargs="+", required=True, help="NAME=cache, e.g. id=test.safetensors shifted=test_ood.safetensors")
    s.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    s.add_argument("--checkpoint", default=None, help="pre-trained backbone (default: the cell's)")
    s.add_argument("--out", required=True, help="output .parquet")
    s.set_defaults(fn=report.cmd_wise)

    s = sub.add_parser("code-stamp", help="checksums of code files (the workflow's code dependency)")
    s.add_argument("--files", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=tools.cmd_code_stamp)

    s = sub.add_parser("serve", help="fork server: import torch/timm once, run forwarded commands")
    s.add_argument("--socket", required=True, help="Unix socket path")
    s.add_argument("--idle-timeout", type=float, default=900.0, help="exit after this many idle seconds")
    s.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer the parent")
    s.set_defaults(fn=tools.cmd_serve)

    s = sub.add_parser(
        "slurm-run",
        help="snakemake --profile profiles/slurm with a pre-flight, a watchdog and a target check",
        description="peft-core slurm-run [--poll-seconds S] [--stop-seconds S] [--no-preflight] [--] <snakemake args>: "
        "fits the group caps to the partition's nodes, ends the run when a job is PENDING for a reason waiting "
        "cannot resolve, and fails when a requested target is missing at the end (peft_core/slurm_guard.py).",
    )
    s.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="slurm-run's options, then Snakemake's")
    s.set_defaults(fn=tools.cmd_slurm_run)

    s = sub.add_parser("methods", help="list the registered methods")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(fn=tools.cmd_methods)
    return p












# Commands worth sending to a running fork server (they import torch + timm).
FORWARDED = {"train", "train-pack", "prestep", "features", "robustness"}
# The commands that train a cell and save its state when preempted.
CELL_COMMANDS = {"train", "train-pack"}




def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["slurm-run"] and "-h" not in argv[1:2] and "--help" not in argv[1:2]:
        # Snakemake's own options pass through untouched (argparse would refuse them as unknown)
        from .slurm_guard import main as slurm_run

        try:
            return slurm_run(argv[1:])
        except ValueError as err:
            print(f"peft-core slurm-run: error: {err}", file=sys.stderr)
            return 2
    args = parser().parse_args(argv)
    if args.cmd in FORWARDED:
        from .server import forward

        rc = forward(argv)
        if rc is not None:
            return rc
    # a cell command catches the preemption signals from here on (peft_core/preempt.py)
    catch = preemption_flag() if args.cmd in CELL_COMMANDS else nullcontext()
    try:
        with catch:
            return args.fn(args)
    except InputError as err:
        print(f"peft-core: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

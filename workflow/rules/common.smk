# The only place with Python helpers: config validation, cell expansion,
# wildcard constraints and input functions.
import atexit
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from peft_core.config import load_study
from peft_core.errors import InputError
from peft_core.features import CODE as FEATURE_SOURCES
from peft_core.features import feature_spec, plan_reason
from peft_core.halving import plan_rungs
from peft_core.methods import get_method
from peft_core.cells import final_cells
from peft_core.packs import group_into_packs, pack_id
from peft_core.paper import FORMATS, report_outputs
from peft_core.preempt import ignore_step_warning
from peft_core.prestep import prestep_spec
from peft_core.server_launch import Background, group_job_members
from peft_core.slurm_guard import (
    TARGETS_ENV,
    missing_line,
    missing_targets,
    write_targets,
)

# SLURM's early warning reaches every process of a job step: Snakemake and the rule's
# shell must survive it for the trainer to save its state (peft_core/preempt.py).
ignore_step_warning()

if not config:
    raise WorkflowError(
        "no study config: run with --profile profiles/local (the demo) or --configfile config/<study>.yaml"
    )
try:
    STUDY = load_study(config)
except InputError as err:
    raise WorkflowError(f"invalid config: {err}") from None
validate(config, workflow.source_path("../schemas/config.schema.yaml"))

CFG = STUDY.cfg
RES = STUDY.results_dir
REPORT = f"reports/{STUDY.name}"
LOGS = f"logs/{STUDY.name}"
DATASETS = STUDY.dataset_names()
METHODS = STUDY.method_names()
TUNE = {(d, m): STUDY.tuning_cells(d, m) for d in DATASETS for m in METHODS}
# Tuning cells run in packs: one job per method configuration trains its
# lr x weight-decay cells (peft_core/packs.py says why and how staleness is kept).
PACKS = {
    key: {pack_id(pack): pack for pack in group_into_packs(specs)}
    for key, specs in TUNE.items()
}
PACK_SPECS = {pid: pack for packs in PACKS.values() for pid, pack in packs.items()}
# Successive halving (tuning.strategy: halving; peft_core/halving.py): every rung is planned
# here, with the number of configurations it trains; which ones, each job reads at run time
# from the previous rung's ranking (no checkpoint). Rung 0 trains the packs above.
HALVING = CFG.tuning.strategy == "halving"
# Noise-aware promotion (tuning.keep_within_se): how many continue is known at run time,
# so every later rung is planned with room for all the configurations.
NOISE_AWARE = CFG.tuning.keep_within_se is not None
# A later rung's job trains ranked slots of any configuration: one per job for the
# methods with a prestep (its cells must share one result), a pack's size otherwise.
RUNGS = {
    (d, m): plan_rungs(
        list(packs.values()),
        CFG.tuning.eta,
        CFG.tuning.min_epochs,
        CFG.train.epochs,
        1 if get_method(m).prestep is not None else None,
        NOISE_AWARE,
    )
    for (d, m), packs in PACKS.items()
    if HALVING
}
REPO = Path(workflow.basedir).parent
# Rules run `python -m peft_core.cli` from the repository root, which imports
# peft_core from the checkout: a rule's conda env needs only the dependencies.
ENV = "../envs/peft-core.yaml"


# Editing any of these reruns every training cell (shared engine code);
# each method's own file reruns only that method's cells.
# Relative to the working directory (normally the checkout), so moving or
# copying the project does not look like a change of code.
def code_path(path):
    return os.path.relpath(path)


ENGINE_CODE = [
    code_path(REPO / "peft_core" / f)
    for f in (
        "train.py",
        "pace.py",
        "backbones.py",
        "data.py",
        "init.py",
        "preempt.py",
        "batched.py",
    )
]


# A method's own file and the private helpers it imports (e.g. _adapter.py):
# editing them reruns only the cells of the methods that use them.
# The prestep engine (peft_core/prestep.py) is code of the data-dependent methods only.
# The feature cache (peft_core/features.py) is code of the head-only methods (linear) only.
def stage_code(method):
    m = get_method(method)
    return [
        f
        for f, used in (("prestep.py", m.prestep), ("features.py", m.head_only))
        if used
    ]


METHOD_CODE = {
    m: [code_path(p) for p in get_method(m).code_files]
    + [code_path(REPO / "peft_core" / f) for f in stage_code(m)]
    for m in METHODS
}


wildcard_constraints:
    dataset="|".join(DATASETS),
    method="|".join(METHODS),
    cell=r"[0-9a-f]{10}",
    pack=r"[0-9a-f]{10}",
    split=r"[A-Za-z0-9_]+",
    rung=r"[0-9]+",
    chunk=r"[0-9]+",
    key=r"[0-9a-f]{10}",


def cell_dir(spec):
    return f"{RES}/cells/{spec.dataset}/{spec.method}/{spec.cell_id}"


def cache_path(dataset, split):
    """The decoded split (``Study.split_cache``: the name holds the cache's identity)."""
    return STUDY.split_cache(dataset, split)


def disjoint_splits(split):
    """Splits that must share no image with ``split`` (checked when it is cached):
    validation vs tuning-train and test; test vs every split trained or selected on."""
    d = CFG.data
    others = {
        d.tune_eval: [d.tune_train, d.final_eval],
        d.final_eval: [d.tune_train, d.tune_eval, d.final_train],
    }.get(split, [])
    return [s for s in dict.fromkeys(others) if s != split]


def listed_images(listing, layout):
    """How many images a split listing names (0 while it does not exist yet)."""
    path = Path(listing)
    if layout == "imagefolder":
        return sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def cache_mem_mb(listing, layout):
    """Memory for caching one split: a base plus one copy of the decoded images (a
    safety margin: the cache is written image by image, see peft_core/data.py)."""
    n = listed_images(listing, layout)
    return 1000 + (n * 3 * CFG.data.image_size**2) // 2**20


# Data-dependent steps (SCT's channels, GPS's selection, NOAH's search; peft_core/prestep.py):
# one result per (data set, split, backbone, the hyper-parameters the step depends on).
PRESTEP_METHODS = [m for m in METHODS if get_method(m).prestep is not None]


def cell_prestep(spec):
    return prestep_spec(
        spec, CFG.data.tune_train, CFG.data.tune_eval, CFG.train.tune_seed
    )


def prestep_path(pspec):
    return f"{RES}/prestep/{pspec.dataset}/{pspec.method}/{pspec.key}.safetensors"


def _presteps(specs):
    """{result path: PrestepSpec} of cells, in order."""
    return {prestep_path(p): p for p in map(cell_prestep, specs)}


def _final_presteps(specs):
    """A final run takes its prestep for the configuration selection chose: it gets them all."""
    d = CFG.data
    return _presteps(
        final_cells(s, CFG.train.final_seeds[:1], d.final_train, d.final_eval)[0]
        for s in specs
    )


PRESTEPS = {}  # result path -> PrestepSpec
FINAL_PRESTEPS = {}  # (dataset, method) -> result paths of every tuning configuration
# (dataset, method) -> the tuning cells' results (a later halving rung picks its cell's)
TUNE_PRESTEPS = {}
for (_d, _m), _specs in TUNE.items():
    if _m in PRESTEP_METHODS:
        _finals = _final_presteps(_specs)
        TUNE_PRESTEPS[(_d, _m)] = list(_presteps(_specs))
        PRESTEPS.update(_presteps(_specs))
        PRESTEPS.update(_finals)
        FINAL_PRESTEPS[(_d, _m)] = list(_finals)


# Cached frozen features (the linear probe; peft_core/features.py): one file per
# (data set, split) read by a head-only method's cells, when nothing stochastic
# precedes the head; train.feature_cache: false turns it off.
FEATURE_CODE = [code_path(REPO / "peft_core" / f) for f in FEATURE_SOURCES]
FEATURES = {}  # features path -> FeatureSpec
# (dataset, method, "tune" | "final") -> [train features, eval features]
CELL_FEATURES = {}


def features_path(fspec):
    return f"{RES}/features/{fspec.dataset}/{fspec.split}_{fspec.key}.safetensors"


for (_d, _m), _specs in TUNE.items():
    if _specs and plan_reason(_specs[0], CFG.train.feature_cache) is None:
        _final = final_cells(
            _specs[0],
            CFG.train.final_seeds[:1],
            CFG.data.final_train,
            CFG.data.final_eval,
        )[0]
        for _stage, _cell in (("tune", _specs[0]), ("final", _final)):
            _pair = [
                feature_spec(_cell, _cell.train_split),
                feature_spec(_cell, _cell.eval_split),
            ]
            FEATURES.update({features_path(f): f for f in _pair})
            CELL_FEATURES[(_d, _m, _stage)] = [features_path(f) for f in _pair]


def feature_of(wildcards):
    path = f"{RES}/features/{wildcards.dataset}/{wildcards.split}_{wildcards.key}.safetensors"
    if path not in FEATURES:
        raise WorkflowError(f"features {path:q} are not in the config")
    return FEATURES[path]


def prestep_of(wildcards):
    path = prestep_path_of(wildcards)
    if path not in PRESTEPS:
        raise WorkflowError(f"prestep {path:q} is not in the config")
    return PRESTEPS[path]


def prestep_path_of(wildcards):
    return f"{RES}/prestep/{wildcards.dataset}/{wildcards.method}/{wildcards.key}.safetensors"


def prestep_inputs(wildcards):
    """What a prestep reads: its training split (and the validation split, for a search)."""
    pspec = prestep_of(wildcards)
    out = {
        "train": cache_path(pspec.dataset, pspec.train_split),
        "checkpoint": CFG.backbone.checkpoint,
        "code": code_stamp(pspec.method),
    }
    if pspec.eval_split is not None:
        out["eval"] = cache_path(pspec.dataset, pspec.eval_split)
    return out


def optional_args(flag, key):
    """``[flag, *paths]`` for an optional input (``params`` of a shell rule), else []."""

    def args(wildcards, input):
        if key not in input.keys():
            return []
        paths = input[key]
        return [flag, *([paths] if isinstance(paths, str) else paths)]

    return args


def pack_specs(wildcards):
    if wildcards.pack not in PACK_SPECS:
        raise WorkflowError(
            f"pack {wildcards.pack:q} of {wildcards.dataset:q}/{wildcards.method:q} is not in the config"
        )
    return PACK_SPECS[wildcards.pack]


def train_inputs(wildcards):
    """Inputs of a tuning pack (all its cells share them)."""
    return cell_inputs_of(pack_specs(wildcards)[0])


def cell_inputs_of(spec):
    """What a tuning cell reads: its splits, checkpoint, code stamp, prestep result, features."""
    out = {
        "train": cache_path(spec.dataset, spec.train_split),
        "eval": cache_path(spec.dataset, spec.eval_split),
        "checkpoint": CFG.backbone.checkpoint,
        "code": code_stamp(spec.method),
    }
    if spec.method in PRESTEP_METHODS:
        out["prestep"] = prestep_path(cell_prestep(spec))
    if (spec.dataset, spec.method, "tune") in CELL_FEATURES:
        out["features"] = CELL_FEATURES[(spec.dataset, spec.method, "tune")]
    return out


def rung_of(wildcards):
    """The planned rung of a halving job (peft_core/halving.Rung)."""
    rungs = RUNGS.get((wildcards.dataset, wildcards.method), [])
    if int(wildcards.rung) >= len(rungs):
        raise WorkflowError(
            f"rung {wildcards.rung} of {wildcards.dataset}/{wildcards.method} is not in the plan"
        )
    return rungs[int(wildcards.rung)]


def rung_manifest(dataset, method, rung, part):
    return f"{RES}/rungs/{dataset}/{method}/r{rung}/{part}.json"


def ranking_path(dataset, method, rung):
    return f"{RES}/rungs/{dataset}/{method}/r{rung}.json"


def rung_parts(wildcards):
    """The manifests of one rung's jobs: what its ranking reads."""
    rung = rung_of(wildcards)
    return [
        rung_manifest(wildcards.dataset, wildcards.method, rung.index, part)
        for part in rung.parts
    ]


def rank_inputs(wildcards):
    """A rung's manifests, and (noise-aware promotion) the validation split: its size."""
    out = {"manifests": rung_parts(wildcards)}
    if NOISE_AWARE:
        out["eval"] = cache_path(wildcards.dataset, CFG.data.tune_eval)
    return out


def noise_args(wildcards, input):
    """``rank-rung``'s noise-aware promotion arguments (peft_core/halving.py), else []."""
    if not NOISE_AWARE:
        return []
    eta, z = str(CFG.tuning.eta), str(CFG.tuning.keep_within_se)
    return ["--eta", eta, "--keep-within-se", z, "--eval-data", input.eval]


def promoted_inputs(wildcards):
    """A later rung's chunk: the inputs of the method's packs, and the previous rung's ranking."""
    rung = rung_of(wildcards)
    if rung.index == 0 or f"c{wildcards.chunk}" not in rung.parts:
        raise WorkflowError(
            f"chunk {wildcards.chunk} of rung {rung.index} is not in the plan"
        )
    key = (wildcards.dataset, wildcards.method)
    out = cell_inputs_of(TUNE[key][0])
    out["ranking"] = ranking_path(wildcards.dataset, wildcards.method, rung.index - 1)
    if key in TUNE_PRESTEPS:
        out["prestep"] = TUNE_PRESTEPS[key]
    return out


def promoted_slots(wildcards):
    return list(rung_of(wildcards).slots(f"c{wildcards.chunk}"))


def rung_runtime(rung, cells):
    """Minutes for ``cells`` cells trained up to the rung's budget (from scratch, at worst)."""
    return max(
        1, -(-CFG.compute.train.runtime * cells * rung.epochs // CFG.train.epochs)
    )


def tuning_outputs(dataset, method):
    """What selection waits for: the tuning packs (grid) or every rung's ranking (halving)."""
    if HALVING:
        return [
            ranking_path(dataset, method, r.index) for r in RUNGS[(dataset, method)]
        ]
    return pack_manifests(dataset, method)


def selection_args(wildcards):
    """Grid: every tuning cell competes; halving: the last rung's, read from the rankings."""
    if HALVING:
        return ["--rankings", *tuning_outputs(wildcards.dataset, wildcards.method)]
    return ["--cells", *tuning_dirs(wildcards.dataset, wildcards.method)]


def aggregate_cells(wildcards):
    """The tuning cells of a data set's table: all of them (grid), or each last rung's (halving)."""
    if HALVING:
        return ["--rankings"] + [
            tuning_outputs(wildcards.dataset, m)[-1] for m in METHODS
        ]
    return ["--cells"] + [d for m in METHODS for d in tuning_dirs(wildcards.dataset, m)]


def final_inputs(wildcards):
    """Inputs of the final runs of (dataset, method): its selection and the final splits.

    The chosen configuration is read from the selection by the job itself, so the
    DAG is complete before anything runs (no checkpoint, no re-planning mid-run).
    """
    out = {
        "selection": selection_path(wildcards.dataset, wildcards.method),
        "train": cache_path(wildcards.dataset, CFG.data.final_train),
        "eval": cache_path(wildcards.dataset, CFG.data.final_eval),
        "checkpoint": CFG.backbone.checkpoint,
        "code": code_stamp(wildcards.method),
    }
    if wildcards.method in PRESTEP_METHODS:
        out["prestep"] = FINAL_PRESTEPS[(wildcards.dataset, wildcards.method)]
    if (wildcards.dataset, wildcards.method, "final") in CELL_FEATURES:
        out["features"] = CELL_FEATURES[(wildcards.dataset, wildcards.method, "final")]
    return out


def selection_path(dataset, method):
    return f"{RES}/selection/{dataset}/{method}.json"


def final_manifest(dataset, method):
    """Written once every final run (seed) of (dataset, method) is done; lists their cells."""
    return f"{RES}/finals/{dataset}/{method}.json"


def code_stamp(method):
    """One file standing for the engine code and the method's own code (see stamp_code)."""
    return f"{RES}/code/{method}.sha256"


def pack_manifests(dataset, method):
    """The tuning packs of (dataset, method); each is written once its cells are done."""
    return [
        f"{RES}/packs/{dataset}/{method}/{pid}.json" for pid in PACKS[(dataset, method)]
    ]


def tuning_dirs(dataset, method):
    return [cell_dir(s) for s in TUNE[(dataset, method)]]


def dataset_inputs(wildcards):
    """What one data set's table waits for: its tuning packs and its final runs."""
    return {
        "packs": [p for m in METHODS for p in tuning_outputs(wildcards.dataset, m)],
        "finals": [final_manifest(wildcards.dataset, m) for m in METHODS],
        "selections": [selection_path(wildcards.dataset, m) for m in METHODS],
    }


def report_files():
    return [
        f"{REPORT}/{name}"
        for name in ("summary.md", "summary.csv", "results.parquet", "index.html")
    ] + paper_files()


def paper_files():
    """build_report's figures, LaTeX tables and statistics (peft_core/paper.py names them)."""
    return [f"{REPORT}/{name}" for name in report_outputs(STUDY)]


def ensemble_files():
    """Outputs of analyse_ensembles: the analysis needs two methods, else only a note."""
    names = ["ensembles.md"]
    if len(METHODS) >= 2:
        names += ["ensembles.html", "ensembles.parquet", "diversity.parquet"]
        names += [f"figures/ensemble_gain.{fmt}" for fmt in FORMATS]
    return [f"{REPORT}/{name}" for name in names]


def start_fork_server(log):
    """Local runs: one `peft-core serve` process spares every cell ~4 s of imports.

    Jobs find it through $PEFT_CORE_SERVER and fall back to running in-process
    while it starts or if it is gone. Off under cluster executors (their group
    jobs start their own: start_group_job_server), under conda deployment (jobs
    must use their own environment) and with compute.fork_server: false.
    """
    if workflow.local_exec and fork_server_allowed():
        FORK_SERVER["server"] = Background()


def start_group_job_server():
    """SLURM group jobs: the driver (the batch script's Snakemake, which runs no hooks) starts
    one server for its members when it runs two or more (peft_core/server_launch.py); the server
    ends with the driver. Called while the Snakefile is parsed."""
    if group_job_members(sys.argv, os.environ) >= 2 and fork_server_allowed():
        FORK_SERVER["server"] = Background(inherit_output=True)
        atexit.register(stop_fork_server)


def fork_server_allowed():
    return (
        CFG.compute.fork_server
        and not workflow.deployment_settings.deployment_method
        and "server" not in FORK_SERVER
    )


def stop_fork_server():
    server = FORK_SERVER.pop("server", None)
    if server is not None:
        server.stop()


FORK_SERVER = {}


def requested_targets():
    """The files this run was asked for: rule all's inputs, or the outputs of the jobs named as targets
    (explicit files or rules, --until)."""
    dag = workflow.dag
    files = {str(f) for f in dag.targetfiles}
    for job in dag.targetjobs:
        files.update(str(f) for f in (job.output or job.input))
    return sorted(files)


def record_targets():
    """Under `peft-core slurm-run`: hand it the requested targets; it checks them whatever way Snakemake ends."""
    path = os.environ.get(TARGETS_ENV)
    if path:
        write_targets(path, requested_targets())


def check_targets():
    """No false success: Snakemake can end with status 0 and jobs never run (a deadlocked DAG,
    --keep-going). Without slurm-run (which reports it itself), fail with the missing targets.
    """
    if os.environ.get(TARGETS_ENV):
        return
    missing = missing_targets(requested_targets())
    if missing:
        raise WorkflowError(missing_line(missing, prefix="snakemake"))

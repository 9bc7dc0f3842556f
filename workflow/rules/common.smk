# The only place with Python helpers: config validation, cell expansion,
# wildcard constraints and input functions.
import json
from pathlib import Path

from snakemake.exceptions import WorkflowError

from peft_core.config import CellSpec, load_study
from peft_core.errors import InputError
from peft_core.methods import get_method
from peft_core.server import Background

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
RES = f"results/{STUDY.name}"
REPORT = f"reports/{STUDY.name}"
LOGS = f"logs/{STUDY.name}"
DATASETS = STUDY.dataset_names()
METHODS = STUDY.method_names()
TUNE = {(d, m): STUDY.tuning_cells(d, m) for d in DATASETS for m in METHODS}
TUNE_SPECS = {s.cell_id: s for specs in TUNE.values() for s in specs}
REPO = Path(workflow.basedir).parent
# Rules run `python -m peft_core.cli` from the repository root, which imports
# peft_core from the checkout: a rule's conda env needs only the dependencies.
ENV = "../envs/peft-core.yaml"
# Editing any of these reruns every training cell (shared engine code);
# each method's own file reruns only that method's cells.
ENGINE_CODE = [
    str(REPO / "peft_core" / f) for f in ("train.py", "backbones.py", "data.py")
]
# A method's own file and the private helpers it imports (e.g. _adapter.py):
# editing them reruns only the cells of the methods that use them.
METHOD_CODE = {m: [str(p) for p in get_method(m).code_files] for m in METHODS}


wildcard_constraints:
    dataset="|".join(DATASETS),
    method="|".join(METHODS),
    cell=r"[0-9a-f]{10}",
    split=r"[A-Za-z0-9_]+",


def cell_dir(spec):
    return f"{RES}/cells/{spec.dataset}/{spec.method}/{spec.cell_id}"


def cache_path(dataset, split):
    return f"{RES}/cache/{dataset}/{split}_{CFG.data.image_size}px.pt"


def final_specs(dataset, method):
    """Final-run cells of (dataset, method): known once its selection has run."""
    selection = checkpoints.select_config.get(dataset=dataset, method=method).output[0]
    chosen = CellSpec.model_validate(
        json.loads(Path(selection).read_text())["chosen_spec"]
    )
    return [STUDY.final_cell(chosen, seed) for seed in CFG.train.final_seeds]


def spec_for(wildcards):
    if wildcards.cell in TUNE_SPECS:
        return TUNE_SPECS[wildcards.cell]
    for spec in final_specs(wildcards.dataset, wildcards.method):
        if spec.cell_id == wildcards.cell:
            return spec
    raise WorkflowError(
        f"cell {wildcards.cell} of {wildcards.dataset}/{wildcards.method} is not in the config"
    )


def train_inputs(wildcards):
    spec = spec_for(wildcards)
    return {
        "train": cache_path(spec.dataset, spec.train_split),
        "eval": cache_path(spec.dataset, spec.eval_split),
        "checkpoint": CFG.backbone.checkpoint,
        "code": code_stamp(spec.method),
    }


def code_stamp(method):
    """One file standing for the engine code and the method's own code (see stamp_code)."""
    return f"{RES}/code/{method}.sha256"


def tuning_metrics(dataset, method):
    return [f"{cell_dir(s)}/metrics.json" for s in TUNE[(dataset, method)]]


def dataset_cells(wildcards):
    """Every cell of one data set, tuning and final; final ones wait for selection."""
    cells = [cell_dir(s) for m in METHODS for s in TUNE[(wildcards.dataset, m)]]
    cells += [cell_dir(s) for m in METHODS for s in final_specs(wildcards.dataset, m)]
    return cells


def report_files():
    return [
        f"{REPORT}/{name}"
        for name in ("summary.md", "summary.csv", "results.parquet", "index.html")
    ]


def ensemble_files():
    """Outputs of analyse_ensembles: the analysis needs two methods, else only a note."""
    names = ["ensembles.md"]
    if len(METHODS) >= 2:
        names += ["ensembles.html", "ensembles.parquet", "diversity.parquet"]
    return [f"{REPORT}/{name}" for name in names]


def start_fork_server(log):
    """Local runs: one `peft-core serve` process spares every cell ~4 s of imports.

    Jobs find it through $PEFT_CORE_SERVER and fall back to running in-process
    while it starts or if it is gone. Off under cluster executors, under conda
    deployment (jobs must use their own environment) and with compute.fork_server: false.
    """
    if (
        workflow.local_exec
        and CFG.compute.fork_server
        and not workflow.deployment_settings.deployment_method
    ):
        FORK_SERVER["server"] = Background()


def stop_fork_server():
    server = FORK_SERVER.pop("server", None)
    if server is not None:
        server.stop()


FORK_SERVER = {}

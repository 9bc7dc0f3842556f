# Helpers of the data-layout and robustness rules (data.smk, robustness.smk):
# where each data set and shifted test set lives on disk, and what the
# robustness stage evaluates.
import re

from peft_core.robustness import ID_SET, plan_json
from peft_core.robustness_report import figure_stem

OOD_DATASETS = [d for d in DATASETS if STUDY.ood_sets(d)]
OOD_NAMES = sorted({n for d in OOD_DATASETS for n in STUDY.ood_sets(d)})
# Shifted sets the demo makes itself: their folder -> (data set, split).
DEMO_SHIFTS = {
    o.root: (d, o.split)
    for d in OOD_DATASETS
    for o in STUDY.ood_sets(d).values()
    if o.generator == "demo"
}


def ood_listing(dataset, name):
    o = STUDY.ood_sets(dataset)[name]
    return split_listing(o.root, o.split, o.layout or "vtab")


def ood_cache(dataset, name):
    return f"{RES}/cache/{dataset}/ood/{name}_{CFG.data.image_size}px_{CFG.data.interpolation}.safetensors"


def layout_listing(dataset, split):
    root, layout = STUDY.data_location(dataset)
    return split_listing(f"{root}/{dataset}", split, layout)


def eval_caches(dataset):
    """NAME=cache.pt of the ID test split and every shifted set of ``dataset``."""
    caches = {ID_SET: cache_path(dataset, CFG.data.final_eval)}
    caches.update({n: ood_cache(dataset, n) for n in STUDY.ood_sets(dataset)})
    return caches


def robustness_files():
    """Outputs of robustness_report: none when no data set declares shifted sets."""
    if not OOD_DATASETS:
        return []
    return [
        f"{REPORT}/robustness.{ext}" for ext in ("md", "html", "parquet")
    ] + robustness_figures()


def robustness_figures():
    """figures/wise_<dataset>_<set>.*: per shifted set, and their mean when there are several."""
    sets = {d: list(STUDY.ood_sets(d)) for d in OOD_DATASETS}
    return [
        f"{REPORT}/figures/{figure_stem(d, s)}.{fmt}"
        for d, names in sets.items()
        for s in names + (["ood_mean"] if len(names) > 1 else [])
        for fmt in FORMATS
    ]


def split_listing(root, split, layout):
    """What lists one split under a data-set folder: a file (vtab, csv) or a folder (imagefolder)."""
    suffix = {"vtab": ".txt", "csv": ".csv", "imagefolder": ""}[layout]
    return f"{root}/{split}{suffix}"


def one_of(names):
    """A wildcard regex matching exactly ``names`` (nothing at all when empty)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


# Data sets in the default place and layout (data.root, vtab) use cache_split;
# the others cache_split_layout, so that studies in the default layout keep
# their recorded jobs unchanged (no cache, hence no cell, reruns).
DEFAULT_LAYOUT = [
    d for d in DATASETS if STUDY.data_location(d) == (CFG.data.root, "vtab")
]
OTHER_LAYOUT = [d for d in DATASETS if d not in DEFAULT_LAYOUT]


# A shifted set the workflow does not make must exist before anything runs.
for _d in OOD_DATASETS:
    for _n, _o in STUDY.ood_sets(_d).items():
        if _o.generator is None and not Path(ood_listing(_d, _n)).exists():
            raise WorkflowError(
                f"invalid config: datasets.{_d}.ood.{_n}.root: {ood_listing(_d, _n)} not found"
            )

"""Typed configuration: the study config, the per-cell spec and its identity.

Pydantic is the single source of truth: ``workflow/schemas/config.schema.json``
is exported from :func:`study_json_schema`, the Snakefile validates against it,
and every config error is reported as one line naming the field path, e.g.
``methods.lora.rank[0]: Input should be greater than or equal to 1 (got 0)``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import typing
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import InputError

GROUPS = ("natural", "specialized", "structured")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
# Learning-rate schedules: the reference codebase's timm CosineLRScheduler stepped once per
# epoch (and one epoch late), or the same warm-up + cosine curve evaluated at every step.
SCHEDULES = ("reference_epoch", "per_step")
# PEFT-module and head initialisation: the methods' intended one (zero up-projections, ...),
# or the reference codebase's as-run one (timm init_weights re-run after adding the modules).
INITS = ("intended", "reference")
NAME = r"^[a-z][a-z0-9_]*$"


def _plain_path(path: str) -> str:
    """Paths reach Snakemake patterns and shell commands (always quoted there): spaces,
    ``;`` or ``$()`` are used literally; braces (Snakemake wildcards) and control
    characters cannot be, so they are refused here."""
    bad = next((c for c in path if c in "{}" or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"{path!r}: {bad!r} is not allowed in a path (braces are Snakemake wildcards)")
    if not path.strip():
        raise ValueError("empty path")
    return path


PathStr = Annotated[str, AfterValidator(_plain_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Layout = Literal["vtab", "imagefolder", "csv"]
LAYOUT_HELP = (
    "vtab: <split>.txt of 'relative/path label' lines; csv: <split>.csv with a path,label header; "
    "imagefolder: <split>/<class_name>/<image> (labels = sorted folder index); see peft_core/data.py"
)


class OodSpec(Strict):
    """A shifted (out-of-distribution) test set of an ID data set: evaluated only, never trained or selected on.

    A subset-class set (ImageNet-A/-R use 200 of ImageNet-1k's 1000 classes)
    gives ``class_map``: entry ``i`` is the ID class of this set's label ``i``;
    the model's logits are restricted to those classes before the argmax.
    """

    root: PathStr = Field(
        description="folder holding the split: <root>/<split>.txt (vtab), <root>/<split>.csv (csv) "
        "or <root>/<split>/<class_name>/<image> (imagefolder)"
    )
    layout: Layout | None = Field(None, description=f"default vtab. {LAYOUT_HELP}")
    split: str = Field("test", pattern=r"^[A-Za-z0-9_.-]+$", description="split name (file or folder)")
    num_classes: int | None = Field(
        None, ge=1, description="classes of this set (default: len(class_map), else the ID data set's)"
    )
    class_map: list[Annotated[int, Field(ge=0)]] | PathStr | None = Field(
        None,
        description="ID class index of each of this set's classes, as a list or a text file of one index "
        "per line (# comments); logits are restricted to these classes before the argmax",
    )
    generator: Literal["demo"] | None = Field(
        None, description="demo only: the workflow makes this set, a colour/background shift of the ID test split"
    )


class DatasetSpec(Strict):
    num_classes: int = Field(ge=2, description="number of classes (labels are 0..num_classes-1)")
    group: Literal["natural", "specialized", "structured"] = Field(description="VTAB group tag")
    layout: Layout | None = Field(None, description=f"on-disk layout of <root>/<dataset>/, default vtab. {LAYOUT_HELP}")
    root: PathStr | None = Field(None, description="folder holding <dataset>/ (default: data.root)")
    ood: dict[Annotated[str, Field(pattern=NAME)], OodSpec] | None = Field(
        None, description="shifted test sets: name -> where they are (WiSE-FT robustness analysis)"
    )
    test_cache_from: Annotated[str, Field(pattern=NAME)] | None = Field(
        None,
        description="another data set of this study with the same test listing (byte for byte): its decoded "
        "test cache serves this one too (the sizes of a many-shot data set share one test set)",
    )


def _default_alphas() -> list[float]:
    return [round(i / 10, 1) for i in range(11)]


class RobustnessConfig(Strict):
    alphas: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=_default_alphas,
        min_length=1,
        description="WiSE-FT mixing coefficients: 0 = pre-trained backbone (fine-tuned head), 1 = fine-tuned model",
    )

    @field_validator("alphas")
    @classmethod
    def _distinct(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError(f"alphas must be distinct (got {v})")
        return sorted(v)


class DataConfig(Strict):
    root: PathStr = Field(description="processed VTAB-1k root: <root>/<dataset>/<split>.txt")
    generator: Literal["demo"] | None = Field(
        None, description="'demo': the embedded demo data is generated into `root` by a workflow rule"
    )
    image_size: int = Field(224, ge=8, description="images are resized to image_size x image_size")
    normalize: Literal["none", "imagenet", "inception"] = Field(
        "none", description="input normalisation; the reference VTAB-1k protocol uses none"
    )
    interpolation: Literal[INTERPOLATIONS] = Field(  # type: ignore[valid-type]
        "bicubic",
        description="resize filter of the tensor cache; the reference protocol resizes the processed "
        "VTAB-1k PNGs with bicubic (torchvision Resize on PIL images)",
    )
    tune_train: str = Field("train800", description="split trained on while tuning")
    tune_eval: str = Field("val200", description="split that selects the configuration")
    final_train: str = Field("train800val200", description="split of the final runs")
    final_eval: str = Field("test", description="split reported, never used for selection")

    @model_validator(mode="after")
    def _test_split_stays_unseen(self) -> "DataConfig":
        """Selection on (or tuning with) the reported split would leak it."""
        if self.final_eval in (self.tune_train, self.tune_eval, self.final_train):
            raise ValueError(f"final_eval split {self.final_eval!r} must not be used for tuning or training")
        return self


class PretrainConfig(Strict):
    """Upstream pre-training of the demo backbone on a separate synthetic task."""

    images: int = Field(12000, ge=100)
    epochs: int = Field(12, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0


class BackboneConfig(Strict):
    model: str = Field(description="timm model name, e.g. vit_base_patch16_224")
    checkpoint: PathStr = Field(description="local checkpoint file (.safetensors/.pth/.bin/.npz); never downloaded")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    pretrain: PretrainConfig | None = Field(
        None, description="demo only: produce `checkpoint` by pre-training on a synthetic upstream task"
    )


class PaceConfig(Strict):
    """PACE (Ni et al., 2024): consistency regularisation under multiplicative noise on adapter outputs."""

    sigma: float = Field(
        ge=0, description="std of the noise z ~ N(1, sigma^2) multiplying each adapter output (per sample, per channel)"
    )
    weight: float = Field(ge=0, description="lambda: weight of the mean over samples of ||f1(x) - f2(x)||^2 (logits)")


class TrainConfig(Strict):
    lr: list[Annotated[float, Field(gt=0)]] = Field(
        [1e-3, 1e-2], min_length=1, description="lr grid", json_schema_extra={"x-grid": True}
    )
    weight_decay: list[Annotated[float, Field(ge=0)]] = Field(
        [1e-4, 1e-3], min_length=1, description="wd grid", json_schema_extra={"x-grid": True}
    )
    epochs: int = Field(100, ge=1)
    warmup_epochs: int = Field(10, ge=0)
    warmup_lr_init: float = Field(1e-6, ge=0)
    lr_min: float = Field(1e-5, ge=0)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    schedule: Literal[SCHEDULES] = Field(  # type: ignore[valid-type]
        "reference_epoch",
        description="reference_epoch: warm-up + cosine set once per epoch, stepped as the reference codebase "
        "steps timm's CosineLRScheduler; per_step: the same curve evaluated at every optimiser step",
    )
    init: Literal[INITS] = Field(  # type: ignore[valid-type]
        "intended",
        description="intended: each method's own initialisation (identity at init where promised); "
        "reference: as the reference codebase ran it (timm init_weights after adding the PEFT modules)",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="autocast dtype (fp32 master weights): auto = bf16 when the training jobs get a GPU "
        "(compute.train.gpu > 0 or device cuda), else fp32; resolved before the cell id is computed",
    )
    compile: bool = Field(False, description="torch.compile the model (pays off for long GPU cells)")
    feature_cache: bool = Field(
        True,
        description="head-only methods (linear) train on the frozen backbone's features, computed once per "
        "split (rule extract_features), when nothing stochastic precedes the head (drop_path 0, no dropout); "
        "same result as training on the images, not part of the cell id",
    )
    pace: PaceConfig | None = Field(
        None,
        description="optional PACE regulariser (adapter / LoRA methods only; peft_core/pace.py): two forward "
        "passes with independent noise on the adapter outputs; part of the cell id when set",
    )
    tune_seed: int = Field(0, description="seed of every tuning cell")
    final_seeds: list[int] = Field(
        [0, 1, 2], min_length=1, description="one final run per seed", json_schema_extra={"x-grid": True}
    )

    @field_validator("lr", "weight_decay", "final_seeds", mode="before")
    @classmethod
    def _scalar_to_list(cls, v: Any) -> Any:
        return v if isinstance(v, list) else [v]


class TuningConfig(Strict):
    """How the tuning grid is searched (peft_core/halving.py); selection stays on validation only."""

    strategy: Literal["grid", "halving"] = Field(
        "grid",
        description="grid: every tuning cell trains train.epochs (the reference protocol); halving: successive "
        "halving, every configuration trains min_epochs, the top 1/eta by validation accuracy continue to eta "
        "times the budget, up to train.epochs (our addition, docs/deviations.md)",
    )
    eta: int = Field(3, ge=2, description="halving: keep the top ceil(n / eta) configurations of each rung")
    min_epochs: int = Field(1, ge=1, description="halving: the first rung's budget (epochs); <= train.epochs")


class TrainResources(Strict):
    threads: int = Field(1, ge=1, description="torch threads per training job (Snakemake `threads`)")
    gpu: int = Field(0, ge=0, description="GPUs per training job (SLURM --gpus)")
    mem_mb: int = Field(4000, ge=100)
    runtime: int = Field(60, ge=1, description="minutes per training job on a cluster")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batched_packs: bool = Field(
        False,
        description="train a pack's cells as one vmapped model (peft_core/batched.py): one C-times larger batch "
        "per step; cells with dropout, drop-path, a step hook, a prestep or PACE train alone. Equal to solo "
        "training up to rounding; recorded per cell (metrics.json `batched`), and a cell is reused only when "
        "trained the same way",
    )


class ComputeConfig(Strict):
    train: TrainResources = Field(default_factory=TrainResources)
    fork_server: bool = Field(
        True,
        description="local runs: one process imports torch/timm once and forks per cell (saves ~4 s per cell)",
    )


# --------------------------------------------------------------------- method grids


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_sequence(a) for a in typing.get_args(annotation))
    return origin in (list, tuple) or annotation in (list, tuple)


def _to_grid(value: Any, sequence_field: bool) -> list[Any]:
    """A YAML value -> list of grid values. For list-typed fields a grid is a list of lists."""
    if not isinstance(value, list):
        return [value]
    if sequence_field and not all(isinstance(v, list) for v in value):
        return [value]
    return value


# Per-method optimiser grids: e.g. full fine-tuning needs lower learning rates
# than PEFT methods (the reference study's shared grid under-tunes it).
OPTIMISER_OVERRIDES = {"lr": ("learning-rate", {"gt": 0}), "weight_decay": ("weight-decay", {"ge": 0})}


@cache
def grid_model(hp_model: type[BaseModel]) -> type[BaseModel]:
    """A model whose fields are lists of ``hp_model``'s field values (one grid axis each)."""
    fields: dict[str, Any] = {}
    validators: dict[str, Any] = {}
    for name, info in hp_model.model_fields.items():
        item = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        seq = _is_sequence(info.annotation)
        fields[name] = (
            list[item],
            Field(
                default_factory=lambda d=info.default: [d],
                min_length=1,
                description=info.description,
                json_schema_extra={"x-grid": True},
            ),
        )
        validators[f"_grid_{name}"] = field_validator(name, mode="before")(
            classmethod(lambda cls, v, _s=seq: _to_grid(v, _s))
        )
    for name, (what, bound) in OPTIMISER_OVERRIDES.items():
        if name in fields:
            raise TypeError(f"{hp_model.__name__}.{name} clashes with the per-method optimiser override")
        fields[name] = (
            list[Annotated[float, Field(**bound)]] | None,
            Field(None, min_length=1, description=f"this method's own {what} grid (default: train.{name})"),
        )
        validators[f"_grid_{name}"] = field_validator(name, mode="before")(
            classmethod(lambda cls, v: v if v is None or isinstance(v, list) else [v])
        )
    return create_model(
        f"{hp_model.__name__}Grid",
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__=hp_model.__doc__,
        __validators__=validators,
        **fields,
    )


def expand_grid(hp_model: type[BaseModel], grid: BaseModel) -> list[BaseModel]:
    """Every point of a method grid, in listed order (first field varies slowest)."""
    names = list(hp_model.model_fields)
    axes = [getattr(grid, n) for n in names]
    return [hp_model(**dict(zip(names, point))) for point in itertools.product(*axes)]


@cache
def methods_model() -> type[BaseModel]:
    from .methods import get_method, list_methods

    fields = {
        name: (grid_model(get_method(name).hparams) | None, Field(None, description=get_method(name).summary))
        for name in list_methods()
    }
    return create_model("Methods", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


@cache
def study_model() -> type[BaseModel]:
    return create_model(
        "StudyConfig",
        __config__=ConfigDict(extra="forbid", frozen=True),
        study=(str, Field(pattern=NAME, description="name; outputs go to results/<study>, reports/<study>")),
        data=(DataConfig, ...),
        backbone=(BackboneConfig, ...),
        datasets=(dict[Annotated[str, Field(pattern=NAME)], DatasetSpec], Field(min_length=1)),
        methods=(methods_model(), ...),
        train=(TrainConfig, Field(default_factory=TrainConfig)),
        tuning=(TuningConfig, Field(default_factory=TuningConfig)),
        compute=(ComputeConfig, Field(default_factory=ComputeConfig)),
        published=(PathStr | None, Field(None, description="CSV of published accuracies shown beside ours")),
        robustness=(
            RobustnessConfig | None,
            Field(None, description="WiSE-FT analysis of the data sets that declare `ood` sets"),
        ),
    )


def _scalar_or_list(node: Any) -> Any:
    """Grid fields accept a scalar (one value) or a list (an axis): say so in the schema."""
    if isinstance(node, dict):
        # A null default would make snakemake.utils.validate(set_default=True)
        # insert None and then walk an object schema into it.
        node = {k: _scalar_or_list(v) for k, v in node.items() if not (k == "default" and v is None)}
        if node.pop("x-grid", False):
            array = {k: v for k, v in node.items() if k not in ("title", "description", "default")}
            keep = {k: node[k] for k in ("title", "description", "default") if k in node}
            return {**keep, "anyOf": [array["items"], array]}
        return node
    if isinstance(node, list):
        return [_scalar_or_list(v) for v in node]
    return node


def study_json_schema() -> dict[str, Any]:
    schema = _scalar_or_list(study_model().model_json_schema())
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --------------------------------------------------------------------- errors


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("list[", "function-", "tuple[")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """The first error of ``err`` as one line: ``field.path: message (got value)``."""
    first = err.errors()[0]
    loc = _loc(tuple(first["loc"]))
    path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    if first["type"] == "extra_forbidden":
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if parent == "methods":
            from .methods import list_methods

            return f"{path}: unknown method (known: {', '.join(list_methods())})"
        return f"{path}: unknown field"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("missing", "value_error") and not isinstance(first.get("input"), dict) and "input" in first:
        msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    return f"{path}: {msg}" + (f" [+{more} more]" if more else "")


# --------------------------------------------------------------------- study


class Study:
    """A validated study config plus the cells it expands to."""

    def __init__(self, cfg: BaseModel, method_order: list[str] | None = None):
        self.cfg = cfg
        self._order = method_order or []

    @property
    def name(self) -> str:
        return self.cfg.study

    def method_names(self) -> list[str]:
        """Configured methods, in the order the config lists them."""
        chosen = [m for m in type(self.cfg.methods).model_fields if getattr(self.cfg.methods, m) is not None]
        return sorted(chosen, key=lambda m: self._order.index(m) if m in self._order else len(self._order))

    def dataset_names(self) -> list[str]:
        return list(self.cfg.datasets)

    def stage_of(self, spec: "CellSpec") -> str:
        return "final" if spec.eval_split == self.cfg.data.final_eval else "tune"

    def method_grid(self, method: str) -> list[BaseModel]:
        from .methods import get_method

        return expand_grid(get_method(method).hparams, getattr(self.cfg.methods, method))

    def tuning_cells(self, dataset: str, method: str) -> list["CellSpec"]:
        """Cells of one (dataset, method), in listed order: method grid x lr x wd."""
        t, d = self.cfg.train, self.cfg.data
        grid = getattr(self.cfg.methods, method)
        lrs, wds = grid.lr or t.lr, grid.weight_decay or t.weight_decay
        return [
            CellSpec(
                dataset=dataset,
                num_classes=self.cfg.datasets[dataset].num_classes,
                train_split=d.tune_train,
                eval_split=d.tune_eval,
                image_size=d.image_size,
                normalize=d.normalize,
                interpolation=d.interpolation,
                backbone=self.backbone_spec(),
                method=method,
                hparams=hp.model_dump(mode="json"),
                lr=lr,
                weight_decay=wd,
                epochs=t.epochs,
                warmup_epochs=t.warmup_epochs,
                warmup_lr_init=t.warmup_lr_init,
                lr_min=t.lr_min,
                batch_size=t.batch_size,
                eval_batch_size=t.eval_batch_size,
                drop_path=t.drop_path,
                seed=t.tune_seed,
                schedule=t.schedule,
                init=t.init,
                precision=self.precision(),
                compile=t.compile,
                pace=t.pace,
            )
            for hp in self.method_grid(method)
            for lr in lrs
            for wd in wds
        ]

    def backbone_spec(self) -> "BackboneSpec":
        b = self.cfg.backbone
        pretrain = b.pretrain.model_dump(mode="json") if b.pretrain is not None else None
        return BackboneSpec(model=b.model, checkpoint=b.checkpoint, kwargs=b.kwargs, pretrain=pretrain)

    def precision(self) -> str:
        """The autocast precision the training jobs will run, resolved before any cell id exists."""
        return resolve_precision(self.cfg.train.precision, self.cfg.compute.train)

    def final_cell(self, chosen: "CellSpec", seed: int) -> "CellSpec":
        d = self.cfg.data
        return final_cells(chosen, [seed], d.final_train, d.final_eval)[0]

    # ------------------------------------------------------------- data locations, shifted sets

    def data_location(self, dataset: str) -> tuple[str, str]:
        """(folder holding ``<dataset>/``, layout) of an ID data set; defaults: data.root, vtab."""
        spec = self.cfg.datasets[dataset]
        return spec.root or self.cfg.data.root, spec.layout or "vtab"

    def ood_sets(self, dataset: str) -> dict[str, OodSpec]:
        """The shifted test sets declared for ``dataset`` (name -> spec), in listed order."""
        return dict(self.cfg.datasets[dataset].ood or {})

    def ood_class_map(self, dataset: str, name: str) -> list[int] | None:
        """ID class of each class of a shifted set (None: the same classes as the ID set)."""
        cmap = self.ood_sets(dataset)[name].class_map
        return read_class_map(cmap) if isinstance(cmap, str) else (list(cmap) if cmap is not None else None)

    def ood_num_classes(self, dataset: str, name: str) -> int:
        ood, cmap = self.ood_sets(dataset)[name], self.ood_class_map(dataset, name)
        return ood.num_classes or (len(cmap) if cmap is not None else self.cfg.datasets[dataset].num_classes)

    def robustness_alphas(self) -> list[float]:
        return list((self.cfg.robustness or RobustnessConfig()).alphas)


def read_class_map(path: str | Path) -> list[int]:
    """A class-map text file: one integer per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: class map file not found")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not text.isdigit():
            raise InputError(f"{path}:{lineno}: expected a non-negative class index, got {text!r}")
        out.append(int(text))
    if not out:
        raise InputError(f"{path}: class map is empty")
    return out


def check_ood(study: Study) -> None:
    """Class maps must be a one-to-one map into the ID classes, of the shifted set's length."""
    for dataset in study.dataset_names():
        n_id = study.cfg.datasets[dataset].num_classes
        for name, ood in study.ood_sets(dataset).items():
            field = f"datasets.{dataset}.ood.{name}"
            if name == "id":
                raise InputError(f"{field}: 'id' names the in-distribution test split; choose another name")
            if ood.generator == "demo" and (ood.layout or "vtab") != "vtab":
                raise InputError(f"{field}.layout: a demo-generated set is written in the vtab layout")
            try:
                cmap = study.ood_class_map(dataset, name)
            except InputError as err:
                raise InputError(f"{field}.class_map: {err}") from None
            if cmap is None:
                if ood.num_classes not in (None, n_id):
                    raise InputError(
                        f"{field}.num_classes: {ood.num_classes} classes but {dataset} has {n_id}; "
                        "give a class_map (ID class of each of this set's classes)"
                    )
                continue
            bad = next((i for i, c in enumerate(cmap) if not 0 <= c < n_id), None)
            if bad is not None:
                raise InputError(f"{field}.class_map[{bad}]: class {cmap[bad]} outside {dataset}'s 0..{n_id - 1}")
            seen: dict[int, int] = {}
            for i, c in enumerate(cmap):
                if c in seen:
                    raise InputError(f"{field}.class_map[{i}]: class {c} already mapped by entry {seen[c]}")
                seen[c] = i
            if ood.num_classes is not None and ood.num_classes != len(cmap):
                raise InputError(f"{field}.class_map: {len(cmap)} entries, but num_classes is {ood.num_classes}")


def check_shared_tests(study: Study) -> None:
    """``test_cache_from`` names another data set, one step away, with the same classes and test listing."""
    final = study.cfg.data.final_eval
    for dataset, spec in study.cfg.datasets.items():
        other = spec.test_cache_from
        if other is None:
            continue
        field = f"datasets.{dataset}.test_cache_from"
        if other == dataset or other not in study.cfg.datasets:
            raise InputError(f"{field}: {other!r} is not another data set of this study")
        if study.cfg.datasets[other].test_cache_from is not None:
            raise InputError(f"{field}: {other!r} itself reads {study.cfg.datasets[other].test_cache_from!r}'s cache")
        if study.cfg.datasets[other].num_classes != spec.num_classes:
            raise InputError(f"{field}: {other!r} has {study.cfg.datasets[other].num_classes} classes, not {spec.num_classes}")
        mine, theirs = (_test_listing(study, d, final) for d in (dataset, other))
        if mine.is_file() and theirs.is_file() and mine.read_bytes() != theirs.read_bytes():
            raise InputError(f"{field}: {mine} and {theirs} differ; only an identical test listing can share a cache")


def _test_listing(study: Study, dataset: str, split: str) -> Path:
    root, layout = study.data_location(dataset)
    suffix = {"vtab": ".txt", "csv": ".csv"}.get(layout, "")
    return Path(root) / dataset / f"{split}{suffix}"


def load_study(raw: dict[str, Any] | str | Path) -> Study:
    """Validate a study config (a dict or a YAML path); one-line InputError on failure."""
    if not isinstance(raw, dict):
        path = Path(raw)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        raw = yaml.safe_load(path.read_text()) or {}
    try:
        order = list(raw.get("methods") or {}) if isinstance(raw.get("methods"), dict) else []
        study = Study(study_model().model_validate(raw), order)
    except ValidationError as err:
        raise InputError(format_validation_error(err)) from None
    check_ood(study)
    check_shared_tests(study)
    tuning, epochs = study.cfg.tuning, study.cfg.train.epochs
    if tuning.strategy == "halving" and tuning.min_epochs > epochs:
        raise InputError(f"tuning.min_epochs: {tuning.min_epochs} exceeds train.epochs ({epochs})")
    if study.cfg.train.pace is not None:
        from .pace import check_method

        for method in study.method_names():
            check_method(method)
    return study


# --------------------------------------------------------------------- cells


def resolve_precision(precision: str, resources: TrainResources) -> str:
    """``auto`` -> bf16 where the training jobs run on a GPU, fp32 otherwise.

    Jobs get a GPU when the config asks for one (``compute.train.gpu`` or
    ``device: cuda``); with ``device: auto`` and no GPU requested, a local run
    uses CUDA when this machine has it.
    """
    if precision != "auto":
        return precision
    if resources.device == "cpu":
        return "fp32"
    if resources.device == "cuda" or resources.gpu > 0:
        return "bf16"
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


class BackboneSpec(Strict):
    model: str
    checkpoint: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # demo backbones: the pre-training that produced `checkpoint` (part of the identity)
    pretrain: dict[str, Any] | None = None


class CellSpec(Strict):
    """Everything that determines one training run; its hash is the cell's identity."""

    dataset: str
    num_classes: int
    train_split: str
    eval_split: str
    image_size: int
    normalize: str
    interpolation: Literal[INTERPOLATIONS]  # type: ignore[valid-type]
    backbone: BackboneSpec
    method: str
    hparams: dict[str, Any]
    lr: float
    weight_decay: float
    epochs: int
    warmup_epochs: int
    warmup_lr_init: float
    lr_min: float
    batch_size: int
    eval_batch_size: int
    drop_path: float
    seed: int
    schedule: Literal[SCHEDULES]  # type: ignore[valid-type]
    init: Literal[INITS]  # type: ignore[valid-type]
    precision: Literal["bf16", "fp32"]  # resolved: a CPU-fp32 and a GPU-bf16 cell never share an id
    compile: bool = False
    #: PACE regulariser; omitted from every dump when None, so cells without it keep their ids
    pace: PaceConfig | None = None

    @model_serializer(mode="wrap")
    def _omit_pace_off(self, handler) -> dict[str, Any]:
        out = handler(self)
        if out.get("pace", 0) is None:
            del out["pace"]
        return out

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def identity(self) -> dict[str, Any]:
        """The hashed fields: all of them. What the cell *read* (data caches, checkpoint
        bytes) is fingerprinted by content at run time (peft_core/fingerprint.py)."""
        return self.model_dump(mode="json")

    @property
    def cell_id(self) -> str:
        return cell_hash(self.identity())


CELL_ID = re.compile(r"^[0-9a-f]{10}$")


def cell_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical (key-sorted, compact) JSON, first 10 hex characters."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def final_cells(chosen: CellSpec, seeds: list[int], train_split: str, eval_split: str) -> list[CellSpec]:
    """The final runs of a chosen tuning cell: same configuration, final splits, one cell per seed."""
    return [
        chosen.model_copy(update={"train_split": train_split, "eval_split": eval_split, "seed": seed}) for seed in seeds
    ]

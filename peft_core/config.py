"""Typed configuration: the study config, the per-cell spec and its identity.

Pydantic is the single source of truth: ``workflow/schemas/config.schema.json``
is exported from :func:`study_json_schema`, the Snakefile validates against it,
and every config error is reported as one line naming the field path, e.g.
``methods.lora.rank[0]: Input should be greater than or equal to 1 (got 0)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from .cells import BackboneSpec, CellSpec, final_cells, resolve_precision
from .errors import InputError
from .grids import expand_grid, format_validation_error, study_model
from .sections import OodSpec, RobustnessConfig

# --------------------------------------------------------------------- study


class Study:
    """A validated study config plus the cells it expands to."""

    def __init__(self, cfg: BaseModel, method_order: list[str] | None = None):
        self.cfg = cfg
        self._order = method_order or []

    @property
    def name(self) -> str:
        return self.cfg.study

    @property
    def results_dir(self) -> str:
        """Where the study's results go, relative to the working directory."""
        return f"results/{self.name}"

    def split_cache(self, dataset: str, split: str) -> str:
        """The decoded split's file, relative to the working directory; its name holds the size
        and resize filter (the cache's identity). A data set with ``test_cache_from`` reads that
        data set's test cache (the same listing, checked when it is cached)."""
        d = self.cfg.data
        shared = self.cfg.datasets[dataset].test_cache_from if dataset in self.cfg.datasets else None
        if shared and split == d.final_eval:
            dataset = shared
        return f"{self.results_dir}/cache/{dataset}/{split}_{d.image_size}px_{d.interpolation}.safetensors"

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
    if tuning.strategy == "grid" and tuning.keep_within_se is not None:
        raise InputError("tuning.keep_within_se: only with tuning.strategy halving (the grid promotes nothing)")
    if study.cfg.train.pace is not None:
        from .pace import check_method

        for method in study.method_names():
            check_method(method)
    return study

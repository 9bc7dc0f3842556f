"""Method grids (a YAML list per hyper-parameter -> one model per point), the study model
built from the method registry, its JSON schema, and one-line validation errors.
"""

from __future__ import annotations

import itertools
import typing
from functools import cache
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
)

from .sections import (
    NAME,
    BackboneConfig,
    ComputeConfig,
    DataConfig,
    DatasetSpec,
    PathStr,
    RobustnessConfig,
    TrainConfig,
    TuningConfig,
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

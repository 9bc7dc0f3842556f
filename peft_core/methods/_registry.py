"""Name -> method registry.

Filled once, at import time of the method modules (like timm's
``register_model``); nothing mutates it afterwards, so model builds never
share state through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel, ConfigDict

from ..errors import InputError

if TYPE_CHECKING:
    from torch import nn


class HParams(BaseModel):
    """Base of every method's hyper-parameter model: frozen, typos rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class StepHook:
    """What the training loop calls for a method that changes itself while training.

    ``step(model, hp, step, total_steps)`` runs after every optimiser step, its
    gradients still in place (``step`` 0-based, ``total_steps`` of the whole
    cell); ``state(model)`` / ``load_state(model, state)`` carry the hook's own
    state (tensors, lists, numbers) through ``resume.pt``, so a resumed cell
    continues exactly where it stopped.
    """

    step: Callable[["nn.Module", HParams, int, int], None]
    state: Callable[["nn.Module"], dict]
    load_state: Callable[["nn.Module", dict], None]


@dataclass(frozen=True)
class Prestep:
    """A data-dependent step a method runs on the task's data before training (SCT, GPS, NOAH).

    ``compute(model, hp, data)`` gets the frozen pre-trained backbone with a new
    head (``drop_path`` 0, eval mode) and a :class:`peft_core.prestep.PrestepData`
    and returns named tensors (channel indices, masks, a searched subnet), which
    ``apply(model, hp, state)`` then reads. ``key(hp)`` names the hyper-parameters
    the step depends on: ``compute`` receives an ``HParams`` built from those
    fields alone, so a grid over the others (a learning rate, a scale) shares
    one cached result. ``placeholder(model, hp)`` is a data-free stand-in of the
    same shapes (the first channels, ...), for parameter counts and the contract
    tests; a trained cell never uses it. ``reads``: ``"train"`` (the cell's own
    training split) or ``"train+val"`` (the tuning splits: a search selected on
    validation, reused unchanged by the final runs).
    """

    compute: Callable[["nn.Module", HParams, object], dict]
    key: Callable[[HParams], dict]
    placeholder: Callable[["nn.Module", HParams], dict]
    reads: str = "train"

    def __post_init__(self):
        if self.reads not in ("train", "train+val"):
            raise ValueError(f"Prestep.reads must be 'train' or 'train+val', not {self.reads!r}")


@dataclass(frozen=True)
class Method:
    name: str
    hparams: type[HParams]
    apply: Callable[["nn.Module", HParams], "nn.Module"]
    merge: Callable[["nn.Module"], "nn.Module"] | None
    source: Path
    summary: str
    #: one-line statements of how this method differs from the reference codebase
    deviations: tuple[str, ...] = ()
    #: for the few methods that change themselves while training (AdaLoRA's rank budget)
    step_hook: StepHook | None = None
    #: for methods that choose something from the task's data before training
    prestep: Prestep | None = None
    #: only the classification head trains (the linear probe): its cells may train on
    #: cached frozen features (peft_core/features.py)
    head_only: bool = False

    @property
    def mergeable(self) -> bool:
        return self.merge is not None

    @property
    def code_files(self) -> list[Path]:
        """The method's file plus the private helper modules it imports, transitively.

        The workflow declares these as inputs of the method's cells, so editing
        ``_adapter.py`` reruns the adapter methods' cells and nothing else.
        """
        return _local_imports(self.source)

    def build(self, model: "nn.Module", hp: HParams, state: dict | None = None) -> "nn.Module":
        """``apply``; a method with a prestep gets its result (None: its data-free placeholder)."""
        if self.prestep is None:
            if state is not None:
                raise ValueError(f"method {self.name!r} has no prestep, but a prestep result was given")
            return self.apply(model, hp)
        return self.apply(model, hp, state)


def _local_imports(path: Path) -> list[Path]:
    """``path`` and every sibling module reached by relative imports (``from ._x import``, ``from . import _x``)."""
    import ast

    seen: list[Path] = []
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen or not current.is_file():
            continue
        seen.append(current)
        for node in ast.walk(ast.parse(current.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:  # from ._x import y
                    todo.append(current.parent / f"{node.module}.py")
                else:  # from . import _x (names that are not sibling files are skipped above)
                    todo += [current.parent / f"{alias.name}.py" for alias in node.names]
    return seen


_METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    hparams: type[HParams],
    apply: Callable,
    merge: Callable | None = None,
    deviations: tuple[str, ...] = (),
    step_hook: StepHook | None = None,
    prestep: Prestep | None = None,
    head_only: bool = False,
) -> Method:
    """Register a method; called once at the bottom of each method module.

    ``deviations``: short one-line statements of how the method differs from
    the reference codebase (also in the module docstring and docs/deviations.md).
    ``step_hook``: for methods that change themselves during training
    (:class:`StepHook`); most methods have none.
    ``prestep``: for methods that choose something from the task's training data
    first (:class:`Prestep`); their ``apply`` takes ``(model, hp, state=None)``.
    ``head_only``: ``apply`` leaves every backbone tensor frozen and untouched (only the
    head trains), so the cells may train on cached features (peft_core/features.py).
    """
    if name in _METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    deviations = tuple(deviations)
    bad = [d for d in deviations if not isinstance(d, str) or not d.strip() or "\n" in d]
    if bad:
        raise ValueError(f"method {name!r}: deviations must be non-empty one-line strings, got {bad!r}")
    module = __import__(apply.__module__, fromlist=["__file__"])
    doc = (module.__doc__ or "").strip().splitlines()
    method = Method(
        name=name,
        hparams=hparams,
        apply=apply,
        merge=merge,
        source=Path(module.__file__).resolve(),
        summary=doc[0] if doc else "",
        deviations=deviations,
        step_hook=step_hook,
        prestep=prestep,
        head_only=head_only,
    )
    _METHODS[name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise InputError(f"unknown method {name!r}; known methods: {known}") from None


def list_methods() -> list[str]:
    return sorted(_METHODS)

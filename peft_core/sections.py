"""The sections of a study config (data, backbone, datasets, train, tuning, compute, ...) as
frozen pydantic models that reject unknown keys; :mod:`peft_core.config` assembles them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

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
    keep_within_se: float | None = Field(
        None,
        ge=0,
        description="halving: noise-aware promotion, also promote every configuration whose validation accuracy is "
        "within this many standard errors of the rung's best (e.g. 1.96; peft_core/halving.py, our addition, "
        "docs/deviations.md); null: only the top ceil(n / eta)",
    )


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
        description="one process imports torch/timm once and forks per cell (saves ~4 s per cell): for a local run, "
        "and inside each SLURM group job of two or more members",
    )

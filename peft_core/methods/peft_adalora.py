"""AdaLoRA (Zhang et al., 2023) through Hugging Face peft (``AdaLoraConfig``): LoRA with a rank budget.

Each targeted frozen linear gets an SVD-shaped update ``W + s P diag(E) Q``
(``P``: ``d_out x r``, ``Q``: ``r x d_in``, ``E`` zero at init, so the model
is unchanged) at ``init_rank``; during training the singular values of
lowest importance (smoothed ``|w * grad|``) are masked to zero until the
average rank is ``target_rank``. The schedule runs inside our training loop
(a ``StepHook``: after every optimiser step, as peft's ``update_and_allocate``
asks; its importance averages and rank pattern travel through ``resume.pt``): no pruning in the first ``warmup`` fraction of steps, a cubic budget
decay, fixed ranks in the last ``final`` fraction; the budget is re-allocated
every ``delta_t`` steps. Trainable tensors keep their ``init_rank`` shape
(masked values are zeros), so counts are at ``init_rank``:
``init_rank * (d_in + d_out + 1)`` per linear. Default targets all six
linears of a block, as the paper; ``q``/``k``/``v`` split timm's fused
``attn.qkv`` first. Mergeable through peft's ``merge_and_unload``.

peft adds AdaLoRA's orthogonality regulariser only to outputs carrying a
``.loss`` (Hugging Face models); a timm model returns logits, so it is not
applied here (``orth_reg_weight`` is not a hyper-parameter).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from . import _hf_peft as hf
from ._registry import StepHook, register_method

_PLACEHOLDER_STEPS = 1_000_000  # peft needs a total at build time; allocate() sets the real one


class PeftAdaLoRAHP(hf.TargetsHP):
    targets: tuple[hf.Role, ...] = Field(("q", "k", "v", "o", "fc1", "fc2"), min_length=1, description=hf.TARGETS_DOC)
    init_rank: int = Field(12, ge=1, description="rank of every update at the start (peft's init_r)")
    target_rank: int = Field(8, ge=1, description="average rank the budget shrinks to (peft's target_r)")
    alpha: float | None = Field(None, gt=0, description="scale alpha / rank; None: alpha = init_rank (scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (peft's lora_dropout)")
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of the steps before any pruning (peft's tinit)")
    final: float = Field(0.2, ge=0, lt=1, description="fraction of the last steps at fixed ranks (peft's tfinal)")
    delta_t: int = Field(10, ge=1, description="steps between budget allocations (peft's deltaT)")
    beta1: float = Field(0.85, gt=0, lt=1, description="smoothing of the importance (sensitivity) average")
    beta2: float = Field(0.85, gt=0, lt=1, description="smoothing of its uncertainty")

    @model_validator(mode="after")
    def _schedule(self) -> "PeftAdaLoRAHP":
        if self.target_rank > self.init_rank:
            raise ValueError(f"target_rank: {self.target_rank} exceeds init_rank {self.init_rank}")
        if self.warmup + self.final >= 1:
            raise ValueError(f"warmup + final: must leave a budgeting phase, got {self.warmup} + {self.final}")
        return self


def apply(model: nn.Module, hp: PeftAdaLoRAHP) -> nn.Module:
    return hf.inject(model, hp, lambda peft, paths: peft.AdaLoraConfig(
        init_r=hp.init_rank, target_r=hp.target_rank, lora_alpha=hp.alpha or hp.init_rank,
        lora_dropout=hp.dropout, tinit=0, tfinal=0, deltaT=hp.delta_t, beta1=hp.beta1, beta2=hp.beta2,
        orth_reg_weight=0.0, total_step=_PLACEHOLDER_STEPS, target_modules=paths))  # fmt: skip


def allocate(model: nn.Module, hp: PeftAdaLoRAHP, step: int, total_steps: int) -> None:
    """peft's ``update_and_allocate(step)``, the schedule first set to this run's ``total_steps``."""
    tuner = hf.tuner(model)
    config = tuner.peft_config[hf.ADAPTER]
    if config.total_step != total_steps:
        # floors keep total - tinit - tfinal >= total * (1 - warmup - final) > 0
        config.total_step = total_steps
        config.tinit = int(hp.warmup * total_steps)
        config.tfinal = int(hp.final * total_steps)
    tuner.update_and_allocate(step)


_ALLOCATOR = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # RankAllocator's smoothed importance, by tensor name


def state(model: nn.Module) -> dict:
    """The schedule's state: the allocator's importance averages and the rank pattern, if fixed yet."""
    tuner = hf.tuner(model)
    allocator = tuner.rankallocator
    out = {k: {n: t.detach().clone() for n, t in getattr(allocator, k).items()} for k in _ALLOCATOR}
    out["rank_pattern"] = tuner.peft_config[hf.ADAPTER].rank_pattern
    return out


def load_state(model: nn.Module, saved: dict) -> None:
    tuner = hf.tuner(model)
    for k in _ALLOCATOR:
        setattr(tuner.rankallocator, k, dict(saved[k]))
    tuner.peft_config[hf.ADAPTER].rank_pattern = saved["rank_pattern"]


HOOK = StepHook(step=allocate, state=state, load_state=load_state)
METHOD = register_method("peft_adalora", PeftAdaLoRAHP, apply, hf.merge, step_hook=HOOK)

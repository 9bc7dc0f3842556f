"""PACE (Ni et al., NeurIPS 2024, arXiv 2409.17137): consistency regularisation under
multiplicative noise on the adapter outputs, an optional regulariser of any cell whose
method adds adapter / LoRA branches (``train.pace: {sigma, weight}``).

While training, every adapter output ``h`` (the branch added to the frozen path, before
the sum) becomes ``h * z`` with ``z ~ N(1, sigma^2)`` drawn per sample and per channel
(one value per ``(sample, channel)``, shared by the tokens: the authors' default 'BC'
shape) and no gradient through ``z``. Each step runs the batch twice with independent
noise and minimises

    CE(f1(x), y) + weight * mean_i ||f1(x_i) - f2(x_i)||^2

on the logits (squared differences summed over classes, averaged over the batch, as the
authors' ``PACE_MSELoss``); the training accuracy is the first pass's, the logged
loss the whole objective. Both passes
draw the same dropout and drop-path masks (the global RNG is forked around the first
one), as the authors share the drop-path mask between the two copies. The noise comes
from its own generator, seeded from the cell seed and the step, so a resumed cell
draws the noise it would have drawn. In eval mode the hooks do nothing.

Chosen here where the authors' code differs or is silent:

* the plain two-pass variant only (not PACE_fast's cached previous-epoch logits nor
  the lazy half-batch variant); two calls of the model, not one call on ``cat([x, x])``;
* one ``sigma`` for every adapter (the authors' ViT-B script decays it linearly with
  depth and leaves the first block noise-free).

Where the noise goes is chosen by module *type* (:func:`_noise_types`); methods with
no such module (linear, full, bitfit, ...) are refused when the study is loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

#: methods whose models contain a :func:`_noise_types` module (checked by tests/unit/test_pace.py)
PACE_METHODS = ("adapter", "adaptformer", "convpass", "houlsby", "hydra", "lora", "utuning")


def _noise_types() -> dict[type, str]:
    """Module type -> sub-module (dotted, '' = itself) whose output is the adapter output."""
    from .methods._adapter import BottleneckAdapter
    from .methods.convpass import ConvBypass
    from .methods.hydra import LowRankBranch
    from .methods.lora import LoRALinear

    return {
        LoRALinear: "update",  # s * B A dropout(x), before it is added to the frozen linear's output
        BottleneckAdapter: "",  # adapter, houlsby, adaptformer, utuning (its MLP tuner): scale * up(...)
        ConvBypass: "",  # convpass: the bypass's output
        LowRankBranch: "",  # hydra: each parallel / sequential branch
    }


def check_method(method: str) -> None:
    """One-line refusal of a method without adapter outputs (before anything is built)."""
    if method not in PACE_METHODS:
        raise InputError(
            f"train.pace: method {method!r} adds no adapter outputs to perturb; "
            f"PACE composes with {', '.join(PACE_METHODS)}"
        )


def noise_points(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every adapter output in ``model``, outside the classification head."""
    from .methods._common import head_param_ids

    types = _noise_types()
    head = head_param_ids(model)
    found = []
    for path, module in model.named_modules():
        sub = next((s for t, s in types.items() if type(module) is t), None)
        if sub is None or any(id(p) in head for p in module.parameters()):
            continue
        found.append((f"{path}.{sub}" if sub else path, module.get_submodule(sub) if sub else module))
    return found


class Pace:
    """Noise hooks on a model's adapter outputs, and the two-pass PACE loss."""

    def __init__(self, model: nn.Module, method: str, sigma: float, weight: float, seed: int):
        check_method(method)
        self.points = noise_points(model)
        if not self.points:
            raise InputError(f"train.pace: method {method!r} built no adapter outputs to perturb")
        self.sigma, self.weight, self.seed = sigma, weight, seed
        self.gen: torch.Generator | None = None
        self._step_seed = seed
        self.handles = [m.register_forward_hook(self._hook) for _, m in self.points]

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor):
        if not module.training or self.sigma == 0:
            return None
        if output.ndim < 2:
            raise ValueError(f"PACE: adapter output of shape {tuple(output.shape)} has no channel dimension")
        shape = (output.shape[0],) + (1,) * (output.ndim - 2) + (output.shape[-1],)
        if self.gen is None or self.gen.device != output.device:
            self.gen = torch.Generator(device=output.device)
            self.gen.manual_seed(self._step_seed)
        z = torch.randn(shape, generator=self.gen, device=output.device, dtype=torch.float32)
        return output * (z * self.sigma + 1).to(output.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def loss(
        self, fwd, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, first-pass logits, consistency term) of training step ``step`` (0-based)."""
        self._step_seed = (self.seed * 1_000_003 + step) % (2**63)
        self.gen = None  # re-seeded at the first hook call, on the device of the outputs
        dev = images.device
        cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        fork = torch.random.fork_rng(devices=cuda)
        with fork:  # the RNG is restored after pass 1: pass 2 draws the same dropout / drop-path masks
            logits1 = fwd(images)
        logits2 = fwd(images)
        reg = (logits1.float() - logits2.float()).square().sum(-1).mean()
        return F.cross_entropy(logits1, labels) + self.weight * reg, logits1, reg.detach()

"""NOAH's prestep: train a one-shot supernet on the training split, then search a subnet on validation.

Supernet (AutoFormer-style, as NOAH's ``supernet_train_prompt.py``): every
block's prompt, LoRA and adapter are allocated at the largest size of the
search space; each optimiser step samples one subnet uniformly (a size per
tuner per block) and trains the shared weights through it, with the head.
Search (NOAH's ``evolution.py``, AutoFormer's evolutionary search,
peft_core/methods/_evolution.py): subnets within the parameter limit,
scored by top-1 on the *validation* split through the supernet's weights;
the best subnet seen (ties: fewer parameters, then first found) is the
result; the test split is never read.

Everything random draws from one generator seeded by the prestep's seed, so
the result is a pure function of the data, backbone and hyper-parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ._evolution import accuracy, evolve, train_supernet
from ._noah_modules import set_sizes, subnet_params


def random_sizes(gen: torch.Generator, depth: int, choices: tuple[int, ...]) -> torch.Tensor:
    pick = torch.randint(len(choices), (depth, 3), generator=gen)
    return torch.tensor(choices, dtype=torch.long)[pick]


def val_accuracy(model: nn.Module, sizes: torch.Tensor, data) -> float:
    set_sizes(model, sizes)
    return accuracy(model, data)


def search(model: nn.Module, hp, data, gen: torch.Generator, depth: int, dims: tuple[int, int]):
    """(best subnet ``depth x 3`` sizes, its validation accuracy, subnets scored): the shared evolution
    (peft_core/methods/_evolution.py) over one choice index per tuner per block."""
    choices = torch.tensor(hp.choices, dtype=torch.long)

    def sizes(cand: torch.Tensor) -> torch.Tensor:
        return choices[cand].view(depth, 3)

    limit = hp.param_limit * 1e6
    smallest = subnet_params(torch.full((depth, 3), min(hp.choices)), *dims)
    if smallest > limit:
        raise ValueError(f"param_limit {hp.param_limit}M is below the smallest subnet ({smallest / 1e6:.3f}M)")
    best, acc, scored = evolve(
        torch.full((depth * 3,), len(hp.choices)),
        lambda cand: val_accuracy(model, sizes(cand), data),
        lambda cand: subnet_params(sizes(cand), *dims),
        limit,
        hp,
        gen,
        lambda msg: data.log(f"noah {msg}"),
    )
    return sizes(best), acc, scored


def train(model: nn.Module, hp, data, gen: torch.Generator, depth: int) -> None:
    """The supernet, one uniformly sampled subnet per step."""
    train_supernet(model, hp, data, gen, lambda: set_sizes(model, random_sizes(gen, depth, hp.choices)), "noah")

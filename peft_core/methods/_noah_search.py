"""NOAH's prestep: train a one-shot supernet on the training split, then search a subnet on validation.

Supernet (AutoFormer-style, as NOAH's ``supernet_train_prompt.py``): every
block's prompt, LoRA and adapter are allocated at the largest size of the
search space; each optimiser step samples one subnet uniformly (a size per
tuner per block) and trains the shared weights through it, with the head.
Search (NOAH's ``evolution.py``, AutoFormer's evolutionary search): a
population of random subnets within the parameter limit, scored by top-1 on
the *validation* split through the supernet's weights; each iteration keeps
the best ``parents`` and refills the population with mutations (each size
redrawn with probability ``mutation_prob``) and crossovers (each block's sizes
from one of two parents). The best subnet seen (ties: fewer parameters, then
first found) is the result; the test split is never read.

Everything random draws from one generator seeded by the prestep's seed, so
the result is a pure function of the data, backbone and hyper-parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._noah_modules import set_sizes, subnet_params


def random_sizes(gen: torch.Generator, depth: int, choices: tuple[int, ...]) -> torch.Tensor:
    pick = torch.randint(len(choices), (depth, 3), generator=gen)
    return torch.tensor(choices, dtype=torch.long)[pick]


def train_supernet(model: nn.Module, hp, data, gen: torch.Generator, depth: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.supernet_lr, weight_decay=hp.supernet_weight_decay)
    n = data.images.shape[0]
    per_epoch = math.ceil(n / data.batch_size)
    total = hp.supernet_epochs * per_epoch
    step = 0
    model.train()
    for epoch in range(hp.supernet_epochs):
        order = torch.randperm(n, generator=gen).to(data.images.device)
        loss_sum = 0.0
        for start in range(0, n, data.batch_size):
            idx = order[start : start + data.batch_size]
            set_sizes(model, random_sizes(gen, depth, hp.choices))
            for group in opt.param_groups:  # cosine from lr to 0 over the supernet's steps
                group["lr"] = 0.5 * hp.supernet_lr * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(data.prepare(data.images[idx])), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * idx.numel()
            step += 1
        if epoch == 0 or (epoch + 1) % max(1, hp.supernet_epochs // 5) == 0:
            data.log(f"noah supernet epoch {epoch + 1}/{hp.supernet_epochs} loss {loss_sum / n:.4f}")


@torch.no_grad()
def val_accuracy(model: nn.Module, sizes: torch.Tensor, data) -> float:
    set_sizes(model, sizes)
    model.eval()
    correct = 0
    for x, y in data.batches(val=True):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / data.val_images.shape[0]


def _valid(sizes: torch.Tensor, limit: float, dims: tuple[int, int]) -> bool:
    return subnet_params(sizes, *dims) <= limit


def _draw(gen, make, limit, dims, tries: int = 200) -> torch.Tensor | None:
    """A candidate from ``make()`` within the limit (None after ``tries`` draws over it)."""
    for _ in range(tries):
        cand = make()
        if _valid(cand, limit, dims):
            return cand
    return None


def evolve(model: nn.Module, hp, data, gen: torch.Generator, depth: int, dims: tuple[int, int]):
    """(best subnet, its validation accuracy, subnets scored)."""
    limit = hp.param_limit * 1e6
    choices = torch.tensor(hp.choices, dtype=torch.long)
    scores: dict[tuple, float] = {}

    def score(cand: torch.Tensor) -> float:
        key = tuple(cand.flatten().tolist())
        if key not in scores:
            scores[key] = val_accuracy(model, cand, data)
        return scores[key]

    def mutate(parent: torch.Tensor) -> torch.Tensor:
        redraw = torch.rand(parent.shape, generator=gen) < hp.mutation_prob
        fresh = choices[torch.randint(len(choices), parent.shape, generator=gen)]
        return torch.where(redraw, fresh, parent)

    def cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        take_a = torch.rand(depth, 1, generator=gen) < 0.5
        return torch.where(take_a, a, b)

    population = []
    for _ in range(hp.population):
        cand = _draw(gen, lambda: random_sizes(gen, depth, hp.choices), limit, dims)
        if cand is not None:
            population.append(cand)
    if not population:
        smallest = subnet_params(torch.full((depth, 3), min(hp.choices)), *dims)
        raise ValueError(f"param_limit {hp.param_limit}M is below the smallest subnet ({smallest / 1e6:.3f}M)")
    for it in range(hp.iterations):
        ranked = sorted(population, key=lambda c: (-score(c), subnet_params(c, *dims)))
        parents = ranked[: hp.parents]
        data.log(f"noah search iteration {it + 1}/{hp.iterations}: best val top-1 {score(parents[0]):.4f}")
        children = []
        half = (hp.population - len(parents)) // 2
        for make in [lambda: mutate(parents[int(torch.randint(len(parents), (1,), generator=gen))])] * half + [
            lambda: cross(*(parents[int(i)] for i in torch.randint(len(parents), (2,), generator=gen)))
        ] * (hp.population - len(parents) - half):
            child = _draw(gen, make, limit, dims, tries=20)
            if child is not None:
                children.append(child)
        population = parents + children
    best = min(
        ((key, acc) for key, acc in scores.items()),
        key=lambda kv: (-kv[1], subnet_params(torch.tensor(kv[0]).view(depth, 3), *dims)),
    )
    return torch.tensor(best[0], dtype=torch.long).view(depth, 3), best[1], len(scores)

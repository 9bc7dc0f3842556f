"""One-shot NAS (AutoFormer; NOAH's and GLoRA's ``supernet.py`` / ``evolution.py``): supernet training and evolutionary search.

A candidate is a vector of choice indices (one *gene* per decision, gene
``g`` taking ``0 .. n_choices[g] - 1``). A population of random candidates
within the cost limit is scored (by the caller: top-1 on the validation
split through a supernet's shared weights); each iteration keeps the best
``parents`` and refills the population with mutations (each gene redrawn with
probability ``mutation_prob``) and uniform crossovers of two parents. The best
candidate scored (ties: lower cost, then first scored) is returned. Every
draw comes from ``gen``, so the search is a pure function of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._registry import HParams


class SearchHP(HParams):
    """The supernet and evolutionary-search settings NOAH and GLoRA share (AutoFormer's defaults).

    Each method redeclares ``param_limit`` and ``supernet_lr`` with its own paper's defaults."""

    param_limit: float = Field(1.0, gt=0, description="largest candidate the search may choose, M, head excluded")
    supernet_epochs: int = Field(500, ge=1, description="supernet training epochs on the training split (papers: 500)")
    supernet_lr: float = Field(1e-4, gt=0, description="supernet AdamW learning rate")
    supernet_weight_decay: float = Field(1e-4, ge=0, description="supernet AdamW weight decay")
    population: int = Field(50, ge=2, description="candidates per search iteration (AutoFormer: 50)")
    iterations: int = Field(20, ge=1, description="search iterations (AutoFormer: 20)")
    parents: int = Field(10, ge=1, description="best candidates kept per iteration (AutoFormer's select-num: 10)")
    mutation_prob: float = Field(0.2, ge=0, le=1, description="chance that a mutation redraws each gene (0.2)")


def train_supernet(model: nn.Module, hp, data, gen: torch.Generator, sample: Callable[[], None], name: str) -> None:
    """One-shot supernet training: ``sample()`` switches to a random subnet before every step.

    AdamW at ``hp.supernet_lr`` / ``hp.supernet_weight_decay``, cosine to zero over
    ``hp.supernet_epochs`` epochs of the training split, its order drawn from ``gen``.
    """
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
            sample()
            for group in opt.param_groups:  # cosine from lr to 0 over the supernet's steps
                group["lr"] = 0.5 * hp.supernet_lr * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(data.prepare(data.images[idx])), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * idx.numel()
            step += 1
        if epoch == 0 or (epoch + 1) % max(1, hp.supernet_epochs // 5) == 0:
            data.log(f"{name} supernet epoch {epoch + 1}/{hp.supernet_epochs} loss {loss_sum / n:.4f}")


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    """Top-1 of the model's current subnet on the validation split."""
    model.eval()
    correct = 0
    for x, y in data.batches(val=True):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / data.val_images.shape[0]


def evolve(
    n_choices: torch.Tensor,
    score: Callable[[torch.Tensor], float],
    cost: Callable[[torch.Tensor], int],
    limit: float,
    hp,
    gen: torch.Generator,
    log: Callable[[str], None],
) -> tuple[torch.Tensor, float, int]:
    """(best candidate, its score, candidates scored); ``hp`` has population, iterations, parents, mutation_prob."""
    n_choices = n_choices.long()
    scores: dict[tuple, float] = {}

    def scored(cand: torch.Tensor) -> float:
        key = tuple(cand.tolist())
        if key not in scores:
            scores[key] = score(cand)
        return scores[key]

    def random() -> torch.Tensor:
        return (torch.rand(n_choices.shape, generator=gen) * n_choices).long().clamp(max=n_choices - 1)

    def mutate(parent: torch.Tensor) -> torch.Tensor:
        redraw = torch.rand(parent.shape, generator=gen) < hp.mutation_prob
        return torch.where(redraw, random(), parent)

    def cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.rand(a.shape, generator=gen) < 0.5, a, b)

    def draw(make: Callable[[], torch.Tensor], tries: int) -> torch.Tensor | None:
        for _ in range(tries):
            cand = make()
            if cost(cand) <= limit:
                return cand
        return None

    def pick(pool: list[torch.Tensor]) -> torch.Tensor:
        return pool[int(torch.randint(len(pool), (1,), generator=gen))]

    population = [c for c in (draw(random, 200) for _ in range(hp.population)) if c is not None]
    if not population:
        raise ValueError(f"no candidate within the limit ({limit:,.0f}) in 200 random draws")
    for it in range(hp.iterations):
        ranked = sorted(population, key=lambda c: (-scored(c), cost(c)))
        parents = ranked[: hp.parents]
        log(f"search iteration {it + 1}/{hp.iterations}: best validation top-1 {scored(parents[0]):.4f}")
        room = hp.population - len(parents)
        makers = [lambda: mutate(pick(parents))] * (room // 2) + [lambda: cross(pick(parents), pick(parents))] * (
            room - room // 2
        )
        population = parents + [c for c in (draw(m, 20) for m in makers) if c is not None]
    for cand in population:
        scored(cand)
    best = min(scores.items(), key=lambda kv: (-kv[1], cost(torch.tensor(kv[0]))))
    return torch.tensor(best[0], dtype=torch.long), best[1], len(scores)

"""GLoRA (Chavan et al., 2023) with its per-layer search: W' = W + W*A + B, b' = b + b*D + E + W C.

One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning (Chavan,
Liu, Gupta, Xing, Shen; arXiv 2306.07967); source repository
Arnav0400/ViT-Slim, folder ``GLoRA/`` (``layer.py`` ``SuperScalableLinear``,
``supernet.py``, ``evolution.py``). ``peft_glora`` is Hugging Face peft's
GLoRA at one fixed configuration; this is the paper's method, where each
layer's configuration is searched.

Every ``nn.Linear`` of the transformer blocks (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``) becomes ``F.linear(x, W + W*A + B, b + b*D + E + W C)``
with, per layer, ``A`` and ``B`` each one of rank-``rank`` LoRA (``out x in``),
vector (``out x 1``), constant or none; ``C`` (``in x 1``) LoRA, vector or
none; ``D`` and ``E`` (``out``) vector, constant or none (``layer.py``'s
``config_A_B``, ``config_C``, ``config_D_E``). The zero-initialised factors
make every configuration the identity at init; all of them merge into a
plain linear.

**Prestep (data-dependent, cached, reads="train+val").** As the authors: a
supernet holding every path trains on ``train800`` with one random
configuration per layer per step (``supernet_epochs``, ``supernet_lr``: their
500 epochs at 1e-4), then an evolutionary search (peft_core/methods/_evolution.py)
scores configurations within ``param_limit`` by top-1 on ``val200`` through
the supernet's weights; test is never read. The chosen configuration is then
retrained from zero by the cells (lr x wd grid, selected on validation, final
runs on train800val200) like every other method.

Count of a configuration (head excluded), per layer (``out x in``):
LoRA ``r (out + in)``, vector ``out``, constant 1 for ``A``/``B``; LoRA
``r in + r``, vector ``in`` for ``C``; vector ``out``, constant 1 for ``D``/``E``.
The data-free placeholder (every path LoRA/vector, the largest configuration)
is on ViT-B/16 at rank 4: ``12 (32,260 + 16,900 + 39,940 + 44,548) = 1,603,776``
(qkv, proj, fc1, fc2), an upper bound; a searched configuration's own count
is in its prestep's ``.json`` and in every cell.

A property of the method, not of this code: a *constant* ``E`` on a layer
that writes the residual stream (``attn.proj``, ``mlp.fc2``) adds the same
scalar to every channel, which every pre-norm LayerNorm reading the stream
removes, so its gradient is zero up to rounding; the authors' search space
holds it all the same, and so does ours (the test checks the invariance).

Deviations from the reference code (``METHOD.deviations``, docs/deviations.md):

* the searched configuration is retrained from scratch by the cells (the authors report the supernet's inherited weights)
* in the retrained model a vector or constant path has its own tensor (the supernet, like the authors', shares it with the first column of the LoRA factor)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._common import freeze_all, unfreeze_head
from ._evolution import SearchHP, accuracy, evolve, train_supernet
from ._registry import Prestep, register_method
from ._targets import transformer_blocks

LORA, VECTOR, CONSTANT, NONE = "lora", "vector", "constant", "none"
# per component, its choices (index order = gene value)
SPACE = {"A": (LORA, VECTOR, CONSTANT, NONE), "B": (LORA, VECTOR, CONSTANT, NONE), "C": (LORA, VECTOR, NONE),
         "D": (VECTOR, CONSTANT, NONE), "E": (VECTOR, CONSTANT, NONE)}  # fmt: skip
COMPONENTS = tuple(SPACE)


class GLoRAHP(SearchHP):
    rank: int = Field(4, ge=1, description="rank of the LoRA paths (the authors' --rank)")
    param_limit: float = Field(1.0, gt=0, description="largest configuration the search may choose, M, head excluded")
    supernet_lr: float = Field(1e-4, gt=0, description="supernet AdamW lr (authors' README: 1e-4)")


def _zeros(*shape, like):
    return nn.Parameter(torch.zeros(*shape, device=like.device, dtype=like.dtype))


class GLoRALinear(nn.Module):
    """A frozen linear with GLoRA's five components; ``config`` names each one's path.

    ``supernet=True`` allocates every path (the vector/constant paths read the
    first column/entry of the LoRA factor or vector, as the authors'); otherwise only
    the configured paths, each its own tensor.
    """

    def __init__(self, base: nn.Linear, rank: int, config: dict[str, str], supernet: bool = False):
        super().__init__()
        self.base, self.rank, self.config, self.supernet = base, rank, dict(config), supernet
        out_dim, in_dim, w = base.out_features, base.in_features, base.weight
        for name in COMPONENTS:
            path = LORA if supernet and name in "ABC" else VECTOR if supernet else config[name]
            n = in_dim if name == "C" else out_dim
            if path == LORA:
                setattr(self, f"{name}_down", _zeros(n, rank, like=w))  # zero: the identity at init
                up = _zeros(rank, 1 if name == "C" else in_dim, like=w)
                nn.init.xavier_uniform_(up)
                setattr(self, f"{name}_up", up)
            elif path == VECTOR:
                setattr(self, f"{name}_vec", _zeros(n, like=w))
            elif path == CONSTANT:
                setattr(self, f"{name}_const", _zeros(1, like=w))

    def _term(self, name: str):
        path = self.config[name]
        if path == NONE:
            return None
        if path == LORA:
            return getattr(self, f"{name}_down") @ getattr(self, f"{name}_up")
        if self.supernet and name in "ABC":  # shared with the LoRA factor's first column
            col = getattr(self, f"{name}_down")[:, :1]
            return col if path == VECTOR else col[0, 0]
        vec = getattr(self, f"{name}_vec", None)
        if path == VECTOR:
            return vec.unsqueeze(1) if name in "ABC" else vec
        return getattr(self, f"{name}_const")[0] if not self.supernet else vec[0]

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.base.weight, self.base.bias
        a, bb, c, d, e = (self._term(n) for n in COMPONENTS)
        new_w = w + (w * a if a is not None else 0) + (bb if bb is not None else 0)
        shift = (e if e is not None else 0) + ((w @ c).squeeze(1) if c is not None else 0)
        if b is not None:
            new_b = b + (b * d if d is not None else 0) + shift
        else:
            new_b = shift if torch.is_tensor(shift) else None
        if new_b is not None and new_b.ndim == 0:
            new_b = new_b.expand(w.shape[0])
        return new_w, new_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.effective())


def target_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    blocks = transformer_blocks(model)
    prefix = next(name for name, mod in model.named_children() if mod is blocks)
    return [(f"{prefix}.{p}", m) for p, m in blocks.named_modules() if isinstance(m, nn.Linear)]


def decode(genes: torch.Tensor, n_layers: int) -> list[dict[str, str]]:
    g = genes.view(n_layers, len(COMPONENTS))
    return [{c: SPACE[c][int(v)] for c, v in zip(COMPONENTS, row)} for row in g]


def layer_params(config: dict[str, str], out_dim: int, in_dim: int, rank: int) -> int:
    sizes = {LORA: lambda n: rank * (out_dim + in_dim), VECTOR: lambda n: out_dim, CONSTANT: lambda n: 1, NONE: lambda n: 0}
    total = sum(sizes[config[c]](c) for c in "AB")
    total += {LORA: rank * in_dim + rank, VECTOR: in_dim, NONE: 0}[config["C"]]
    return total + sum({VECTOR: out_dim, CONSTANT: 1, NONE: 0}[config[c]] for c in "DE")


def config_params(configs: list[dict[str, str]], shapes: list[tuple[int, int]], rank: int) -> int:
    return sum(layer_params(cfg, o, i, rank) for cfg, (o, i) in zip(configs, shapes))


def placeholder(model: nn.Module, hp: GLoRAHP) -> dict[str, torch.Tensor]:
    """The largest configuration: LoRA for A, B, C and vectors for D, E in every layer."""
    n = len(target_layers(model))
    return {"genes": torch.zeros(n * len(COMPONENTS), dtype=torch.long)}


def compute(model: nn.Module, hp: GLoRAHP, data) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(data.seed)
    layers = target_layers(model)
    shapes = [(m.out_features, m.in_features) for _, m in layers]
    freeze_all(model)
    supers = []
    for path, lin in layers:
        sup = GLoRALinear(lin, hp.rank, decode(torch.zeros(len(COMPONENTS), dtype=torch.long), 1)[0], supernet=True)
        model.set_submodule(path, sup)
        supers.append(sup)
    unfreeze_head(model)
    n_choices = torch.tensor([len(SPACE[c]) for c in COMPONENTS] * len(layers))

    def use(genes: torch.Tensor) -> None:
        for sup, cfg in zip(supers, decode(genes, len(layers))):
            sup.config = cfg

    def sample() -> None:
        use((torch.rand(n_choices.shape, generator=gen) * n_choices).long().clamp(max=n_choices - 1))

    train_supernet(model, hp, data, gen, sample, "glora")

    def score(genes: torch.Tensor) -> float:
        use(genes)
        return accuracy(model, data)

    best, acc, scored = evolve(
        n_choices, score, lambda g: config_params(decode(g, len(layers)), shapes, hp.rank), hp.param_limit * 1e6,
        hp, gen, lambda msg: data.log(f"glora {msg}"),
    )  # fmt: skip
    return {"genes": best, "val_accuracy": torch.tensor([acc]), "scored": torch.tensor([scored])}


def prestep_key(hp: GLoRAHP) -> dict:
    return hp.model_dump(mode="json")


def apply(model: nn.Module, hp: GLoRAHP, state: dict | None = None) -> nn.Module:
    freeze_all(model)
    layers = target_layers(model)
    genes = (state or placeholder(model, hp))["genes"]
    if genes.numel() != len(layers) * len(COMPONENTS):
        raise ValueError(f"glora: the prestep's configuration has {genes.numel()} choices, not {len(layers) * 5}")
    for (path, lin), cfg in zip(layers, decode(genes.long(), len(layers))):
        model.set_submodule(path, GLoRALinear(lin, hp.rank, cfg))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, GLoRALinear)]:
        w, b = mod.effective()
        base = mod.base
        base.weight.copy_(w)
        if base.bias is not None:
            base.bias.copy_(b)
        elif b is not None:
            base.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        model.set_submodule(path, base)
    return model


DEVIATIONS = (
    "the searched configuration is retrained from scratch by the cells (the authors report the supernet's inherited weights)",
    "in the retrained model a vector or constant path has its own tensor (the supernet, like the authors', shares it with the first column of the LoRA factor)",
)

METHOD = register_method(
    "glora",
    GLoRAHP,
    apply,
    merge,
    deviations=DEVIATIONS,
    prestep=Prestep(compute=compute, key=prestep_key, placeholder=placeholder, reads="train+val"),
)

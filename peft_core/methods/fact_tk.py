"""FacT-TK (Jie & Deng, 2023): Tucker-factorised weight increments shared across layers.

All ``12 L`` d x d slices of the blocks' ``attn.qkv`` (3), ``attn.proj`` (1),
``mlp.fc1`` (4) and ``mlp.fc2`` (4) increments come from one shared core
``C`` (r x r x r), shared ``U`` (r x d), ``V`` (d x r) and ``P`` (r x 12 L):
slice ``m`` has the rank-space core ``S_m[i, j] = sum_k C[i, j, k] P[k, m]``.
With ``h = U x`` (a row vector), the FacT authors' code (``layout="authors"``,
the default) computes, scaled by ``s``, with dropout on the core output:

* q, k, v, proj: ``V (h S_m)``, one slice each;
* fc1: ``T1 = [S_4 .. S_7]`` read as one ``r x 4r`` matrix (column
  ``4 j + m`` is ``S_{4+m}[:, j]``), ``h T1`` cut into four r-wide chunks,
  each mapped by ``V``: every d-wide output chunk mixes all four slices;
* fc2: the hidden vector's four d-wide chunks each mapped by ``U``,
  concatenated to ``g`` (width 4r), then ``V (g T2^T)`` with ``T2`` built
  from ``S_8 .. S_11`` like ``T1`` (the core enters transposed).

On ViT-B/16 that is ``1536 r + 144 r + r^3`` parameters. ``V`` starts at
zero (identity at init). Mergeable: each layer's increment is folded into its
timm linear.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* as run, the reference's late timm init_weights redrew U and V (trunc-normal std 0.02, zero bias), so V was not zero; C and P keep their init; here they start at the intended init (cell init='reference' reproduces it)
* q, k and v share one dropout draw over the fused qkv core output (reference: one draw each; same distribution)
* option layout='per_slice' (our earlier layout: one slice per d x d chunk of fc1/fc2) is not the authors' function; the default 'authors' is
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from ._fact import FacTHP, TuckerFactors, TuckerLayout, apply_fact, merge_fact
from ._registry import register_method


class FacTTKHP(FacTHP):
    """FacT-TK hyper-parameters (reference grid: rank {16, 32, 64} x scale {0.01 .. 100})."""

    layout: TuckerLayout = Field(
        "authors",
        description="how slices fill fc1/fc2 increments: 'authors' (the FacT authors' code, "
        "every chunk mixes all 4 slices) or 'per_slice' (our earlier variant, one slice per chunk)",
    )


def apply(model: nn.Module, hp: FacTTKHP) -> nn.Module:
    return apply_fact(model, hp, TuckerFactors, layout=hp.layout)


def merge(model: nn.Module) -> nn.Module:
    return merge_fact(model)


DEVIATIONS = (
    "as run, the reference's late timm init_weights redrew U and V (trunc-normal std 0.02, zero bias), so V was not zero; C and P keep their init; here they start at the intended init (cell init='reference' reproduces it)",
    'q, k and v share one dropout draw over the fused qkv core output (reference: one draw each; same distribution)',
    "option layout='per_slice' (our earlier layout: one slice per d x d chunk of fc1/fc2) is not the authors' function; the default 'authors' is",
)

METHOD = register_method("fact_tk", FacTTKHP, apply, merge, deviations=DEVIATIONS)

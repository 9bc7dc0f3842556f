"""VQT (Tu et al., CVPR 2023): per-block query tokens read each block; their outputs feed the head.

Before every block ``num_queries`` learnable query tokens are appended to the
block input. An attention mask (timm's ``attn_mask`` argument of
``Block.forward``) lets every token, queries included, attend to the original
tokens only: the queries read the block's tokens, the tokens never see the
queries (the reference study's ``k, v = k[:, :, n:], v[:, :, n:]``). So the
backbone's own token path, and ``forward_features``, are exactly those of the
frozen model. The query outputs of all blocks are collected and, as in the
reference study, combined with the pooled final feature by a learnable
weighted sum before the (unchanged, ``embed_dim``-wide) head::

    feature = sum_j w_j * normalize(q_j) + w_0 * normalize(pooled)

with ``w`` (``depth * num_queries + 1`` weights) initialised to ones and the
result passed on to the model's ``fc_norm`` and head. Queries use VPT's
uniform init ``+-sqrt(6 / (3 * patch_area + dim))`` and dropout (0.1 in the
reference study) on their embeddings while training. ViT-B/16 cost, counted
as the reference does (everything but ``head``):
``12 * num_queries * 768 + (12 * num_queries + 1)``.

Deviations from the reference study's code (its defects): it collects the
query outputs *after* slicing the queries off, i.e. it stores ordinary tokens
and the queries get zero gradient; here the query outputs themselves are
collected, so the queries learn. Its ``F.normalize`` uses the default
``dim=1`` on ``(batch, tokens, dim)`` tensors, normalising across tokens and
reducing the final ``(batch, 1, dim)`` feature to its sign; here every vector
is L2-normalised over its feature dimension. The combine sits in the
``fc_norm`` slot (``pool -> combine -> fc_norm -> head``, the reference's
order), so an average-pooled model's ``fc_norm.*`` keys become
``fc_norm.norm.*``.

The query outputs travel from ``forward_features`` to ``forward_head``
through a per-model channel: ``forward_head`` consumes the outputs of the
latest ``forward_features`` call (``model(x)`` does both) and refuses to run
without them.

Not mergeable: the head reads extra tokens that no weight edit of the plain
backbone produces.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* the query outputs themselves are collected, so the queries learn (reference collects ordinary tokens: the queries get zero gradient)
* F.normalize over the feature dimension (reference: dim=1, across tokens, reducing the final feature to its sign)
* as run, the reference's late timm init_weights redrew the combine weights (trunc-normal std 0.02, zero bias) where its code sets ones; here they start at the intended init (cell init='reference' reproduces it)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._prompts import TokenBlocks, new_tokens, vit_geometry
from ._registry import HParams, register_method


class VQTHP(HParams):
    num_queries: int = Field(10, ge=1, description="number of query tokens per block (reference: vqt_num)")
    dropout: float = Field(
        0.1, ge=0, lt=1, description="dropout on the query embeddings while training (reference: vqt_dropout)"
    )


class QueryChannel:
    """Hands the query outputs of one ``forward_features`` call to the next ``forward_head``.

    Copies (``deepcopy``, pickling) start empty, so a copied model never holds
    a tensor, or an autograd graph, of the original's last forward pass.
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def put(self, value: torch.Tensor) -> None:
        self.value = value

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(
                "vqt: forward_head needs the query outputs of a forward_features call on the same batch "
                "(model(x) does both)"
            )
        return value

    def __deepcopy__(self, memo) -> QueryChannel:
        return QueryChannel()

    def __getstate__(self) -> dict:
        return {"value": None}


class QueryBlocks(TokenBlocks):
    """Runs each block on ``[tokens, queries_i]`` with the queries masked out as keys."""

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        num_prefix_tokens: int,
        dropout: float,
        queries: nn.Parameter,
        channel: QueryChannel,
    ):
        super().__init__(blocks, num_prefix_tokens, dropout)
        if queries.shape[0] != len(self):
            raise ValueError(f"{queries.shape[0]} query sets for {len(self)} blocks")
        self.queries = queries
        self.channel = channel

    @staticmethod
    def attn_mask(num_tokens: int, num_queries: int, device: torch.device) -> torch.Tensor:
        """Boolean mask (True = may attend): no row attends to a query column."""
        allowed = torch.ones(
            num_tokens + num_queries, num_tokens + num_queries, dtype=torch.bool, device=device
        )
        allowed[:, num_tokens:] = False
        return allowed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n = x.shape[0], x.shape[1]
        m = self.queries.shape[1]
        mask = self.attn_mask(n, m, x.device)
        outputs = []
        for block, queries in zip(self, self.queries):
            y = block(torch.cat([x, self.expand(queries, batch)], dim=1), attn_mask=mask)
            x = y[:, :n]
            outputs.append(y[:, n:])
        self.channel.put(torch.cat(outputs, dim=1))
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_queries={self.queries.shape[1]}"


class QueryCombine(nn.Module):
    """``norm(sum_j w_j normalize(q_j) + w_0 normalize(pooled))`` in the model's ``fc_norm`` slot."""

    def __init__(self, norm: nn.Module, num_inputs: int, channel: QueryChannel, like: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.combine = nn.Parameter(torch.ones(num_inputs, device=like.device, dtype=like.dtype))
        self.channel = channel

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        queries = self.channel.take()
        if pooled.dim() != 2 or queries.shape[0] != pooled.shape[0]:
            raise RuntimeError(
                f"vqt: pooled feature {tuple(pooled.shape)} does not match query outputs {tuple(queries.shape)}"
            )
        feats = torch.cat([F.normalize(queries, dim=-1), F.normalize(pooled, dim=-1).unsqueeze(1)], dim=1)
        return self.norm(torch.einsum("bkd,k->bd", feats, self.combine.to(feats.dtype)))


def _accepts_attn_mask(block: nn.Module) -> bool:
    return "attn_mask" in inspect.signature(block.forward).parameters


def apply(model: nn.Module, hp: VQTHP) -> nn.Module:
    freeze_all(model)
    blocks, _, num_prefix = vit_geometry(model)
    if not all(_accepts_attn_mask(b) for b in blocks):
        raise TypeError(f"vqt: the blocks of {type(model).__name__} take no attn_mask")
    if not getattr(model, "global_pool", "") or not isinstance(getattr(model, "fc_norm", None), nn.Module):
        raise ValueError(
            f"vqt: {type(model).__name__} must pool its tokens (global_pool) and have an fc_norm"
        )
    queries = new_tokens(model, sets=len(blocks), count=hp.num_queries)
    channel = QueryChannel()
    model.blocks = QueryBlocks(blocks, num_prefix, hp.dropout, queries, channel)
    model.fc_norm = QueryCombine(model.fc_norm, len(blocks) * hp.num_queries + 1, channel, like=queries)
    return model


DEVIATIONS = (
    'the query outputs themselves are collected, so the queries learn (reference collects ordinary tokens: the queries get zero gradient)',
    'F.normalize over the feature dimension (reference: dim=1, across tokens, reducing the final feature to its sign)',
    "as run, the reference's late timm init_weights redrew the combine weights (trunc-normal std 0.02, zero bias) where its code sets ones; here they start at the intended init (cell init='reference' reproduces it)",
)

METHOD = register_method("vqt", VQTHP, apply, merge=None, deviations=DEVIATIONS)

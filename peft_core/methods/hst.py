"""HST (Lin et al., 2023): a hierarchical convolution-transformer side network fed by meta tokens.

Hierarchical Side-Tuning for Vision Transformers (Lin, Wu, Yang, Huang,
Huang, Jin; arXiv 2310.05393); source repository AFeng-x/HST
(``models/vit_hsn.py``, ``models/vit_custom_modules.py``,
``train_scripts/vit/vtab/*/train_s4.sh``). V-PEFT Bench (arXiv 2402.02242)
lists HST in its VTAB-1k and FGVC tables (0.78M) and ships no HST code, so
the authors' repository is the reference here.

The frozen ViT runs with one learnable *meta token* per block prepended to
its input and removed after it. A side network of ``S = len(widths)`` stages
(widths ``c_s``, 32/48/64/72 with 2/4/8/12 heads on ViT-B/16) reads the image
directly: a stem (3x3 stride-2 conv without bias, BatchNorm, ReLU, 2x2
stride-2 conv, LayerNorm: 1/4 resolution) and, from stage 2 on, a 3x3
stride-2 conv + LayerNorm. The backbone's blocks are split evenly over the
stages (12 / 4 = 3, the authors' ``block_indices`` 2, 5, 8, 11); each block
``i`` of stage ``s`` drives one side block. Its patch tokens are resized
(bilinear) to the stage's grid and projected by the stage's bridge
``T_s: d -> c_s``; its meta token goes through ``T_s`` and a per-block
LayerNorm. The side block (the authors' ``M_Block``) is
``y += attn(norm1(y), kv); y += T_s(patches_i); y += mlp(norm2(y))`` where
``attn`` is cross-attention from the side tokens to two key/value tokens,
the projected meta token and the mean of the projected patches (q, k, v,
proj with biases; MLP ratio 4). Each stage ends with a LayerNorm. The
backbone blocks' ``norm1``/``norm2`` train too (the authors' ``freeze_vit``;
``tune_norms``). Initialisation as the authors': linears trunc-normal 0.02
with zero bias, convs normal(0, sqrt(2 / fan_out)), meta tokens
Xavier-uniform. Not identity at initialisation: the head reads the side
network from the first step.

Deviations from the reference code (``METHOD.deviations``, docs/deviations.md):

* the head reads the backbone's own head path: the side output is averaged over its tokens, up-projected (c_S -> d, a linear with bias), and goes through the backbone's final norm, pooling and head (the authors' head reads the c_S-wide mean through a parameter-free BatchNorm)
* the side stem reads the image through a forward pre-hook on the frozen patch embedding (the authors' model passes the image to both explicitly)

Count on ViT-B/16 (d = 768, 12 blocks, widths 32/48/64/72, one meta token,
3 blocks per stage): stem ``27 c_1 + 2 c_1 + 4 c_1^2 + c_1`` plus its
LayerNorm (5,120); stage convs and norms ``sum_{s>1} (9 c_{s-1} c_s + 3 c_s)``
(83,496); side blocks ``3 sum_s (12 c_s^2 + 13 c_s)`` (462,312); stage norms
``2 sum_s c_s`` (432); bridges ``769 sum_s c_s`` (166,104); meta norms
``6 sum_s c_s`` (1,296); meta tokens ``12 * 768`` (9,216); backbone norms
``12 * 4 * 768`` (36,864); up-projection ``72 * 768 + 768`` (56,064):
820,904 in all (tested, head excluded). The authors' model, without the
up-projection, trains 764,840 plus its 73-per-class head (3,611 on the mean
VTAB-1k data set: 768,451, 0.77M). V-PEFT Bench's 0.78M (the same in its
VTAB-1k and FGVC tables) follows from neither, so the count is tested
against the formula, not the table, and the published accuracies are not
mapped to this method.

Not mergeable: a separate network beside the backbone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.layers import trunc_normal_
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._side import SideNetwork, install, like, side_geometry
from ._targets import resolve_targets


class HSTHP(HParams):
    widths: tuple[int, ...] = Field((32, 48, 64, 72), min_length=1, description="side width per stage (authors' `m_embed_dims`)")
    heads: tuple[int, ...] = Field((2, 4, 8, 12), min_length=1, description="cross-attention heads per stage (authors' `m_c_num_heads`)")
    meta_tokens: int = Field(1, ge=1, description="meta tokens per backbone block (authors' `metaG_num`)")
    tune_norms: bool = Field(True, description="train the backbone blocks' norm1/norm2 (authors' `freeze_vit`)")

    @model_validator(mode="after")
    def _stages(self) -> "HSTHP":
        if len(self.widths) != len(self.heads) or any(w < 1 or h < 1 or w % h for w, h in zip(self.widths, self.heads)):
            raise ValueError(f"widths {self.widths} and heads {self.heads}: one positive width per stage, divisible by its heads")
        return self


def _init(m: nn.Module) -> None:
    """The authors' ``_init_weights``: trunc-normal linears, unit LayerNorms, He-normal convs (fan-out)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups)))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class SideBlock(nn.Module):
    """The authors' ``M_Block``: cross-attention to the meta/global tokens, add the bridged ViT features, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, y: torch.Tensor, kv: torch.Tensor, vit: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        u = self.norm1(y)
        a = F.scaled_dot_product_attention(split(self.q(u)), split(self.k(kv)), split(self.v(kv)))
        y = y + self.proj(a.transpose(1, 2).flatten(2))
        y = y + vit
        return y + self.fc2(F.gelu(self.fc1(self.norm2(y))))


class HierarchicalSide(SideNetwork):
    """Meta tokens, stem, stage convs, bridges, side blocks and the up-projection of HST."""

    def __init__(self, depth: int, dim: int, prefix: int, grid: tuple[int, int], hp: HSTHP, kw: dict):
        super().__init__()
        self.grid = grid
        stages = len(hp.widths)
        if depth % stages:
            raise ValueError(f"widths: {stages} stages do not split the {depth} blocks evenly")
        self.per_stage, self.prefix, self.n_meta = depth // stages, prefix, hp.meta_tokens
        w = hp.widths
        self.meta = nn.Parameter(torch.empty(depth, hp.meta_tokens, dim))
        for i in range(depth):  # each (1, m, d) tensor Xavier-uniform, as the authors' per-block tokens
            nn.init.xavier_uniform_(self.meta.data[i : i + 1])
        self.stem = nn.Sequential(
            nn.Conv2d(3, w[0], 3, 2, padding=1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(), nn.Conv2d(w[0], w[0], 2, 2)
        )
        self.downs = nn.ModuleList(nn.Conv2d(w[s - 1], w[s], 3, 2, padding=1) for s in range(1, stages))
        self.embed_norms = nn.ModuleList(nn.LayerNorm(c) for c in w)
        self.bridges = nn.ModuleList(nn.Linear(dim, c) for c in w)
        self.meta_norms = nn.ModuleList(nn.LayerNorm(w[i // self.per_stage]) for i in range(depth))
        self.side_blocks = nn.ModuleList(SideBlock(w[i // self.per_stage], hp.heads[i // self.per_stage]) for i in range(depth))
        self.stage_norms = nn.ModuleList(nn.LayerNorm(c) for c in w)
        self.up = nn.Linear(w[-1], dim)
        self.apply(_init)
        self.to(**kw)
        self._image: torch.Tensor | None = None

    def keep_image(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the patch embedding: the stem reads the image the backbone reads."""
        self._image = args[0]

    def forward(self, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        image, self._image = self._image, None
        if image is None:
            raise RuntimeError("HST's side network runs inside the model's forward (it reads the image)")
        B, n = x.shape[0], self.n_meta
        metas, feats = [], []
        for i, block in enumerate(blocks):
            x = block(torch.cat([self.meta[i].expand(B, -1, -1), x], dim=1))
            metas.append(x[:, :n])
            feats.append(x[:, n + self.prefix :].transpose(1, 2).unflatten(-1, self.grid))
            x = x[:, n:]
        y = self.stem(image)
        for s, norm in enumerate(self.embed_norms):
            y = self.downs[s - 1](y) if s else y
            hw = y.shape[-2:]
            y = norm(y.flatten(2).transpose(1, 2))
            for i in range(s * self.per_stage, (s + 1) * self.per_stage):
                vit = self.bridges[s](F.interpolate(feats[i], size=hw, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2))
                kv = torch.cat([self.meta_norms[i](self.bridges[s](metas[i])), vit.mean(1, keepdim=True)], dim=1)
                y = self.side_blocks[i](y, kv, vit)
            y = self.stage_norms[s](y)
            y = y.transpose(1, 2).unflatten(-1, hw)
        out = self.up(y.flatten(2).mean(-1))
        return out.unsqueeze(1).expand(-1, x.shape[1], -1)


def apply(model: nn.Module, hp: HSTHP) -> nn.Module:
    freeze_all(model)
    blocks, dim, _ = side_geometry(model)
    grid = tuple(getattr(model.patch_embed, "grid_size", ()))
    if len(grid) != 2 or getattr(model, "dynamic_img_size", False):
        raise ValueError("HST needs a timm ViT with a fixed patch grid (no dynamic_img_size)")
    side = HierarchicalSide(len(blocks), dim, getattr(model, "num_prefix_tokens", 1), grid, hp, like(model))
    model.patch_embed.register_forward_pre_hook(side.keep_image)
    if hp.tune_norms:
        for _, norm in resolve_targets(model, (r"blocks\.\d+\.norm1", r"blocks\.\d+\.norm2"), nn.LayerNorm):
            norm.requires_grad_(True)
    return install(model, blocks, side)


DEVIATIONS = (
    "the head reads the backbone's own head path: the side output is averaged over its tokens, up-projected (c_S -> d, a linear with bias), and goes through the backbone's final norm, pooling and head (the authors' head reads the c_S-wide mean through a parameter-free BatchNorm)",
    "the side stem reads the image through a forward pre-hook on the frozen patch embedding (the authors' model passes the image to both explicitly)",
)

METHOD = register_method("hst", HSTHP, apply, merge=None, deviations=DEVIATIONS)

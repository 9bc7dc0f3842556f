"""Backbones from local checkpoint files, one small generated checkpoint per format.

Each test exports a tiny random-weight timm ViT into a real on-disk layout
(Google .npz, timm/HF .safetensors and .bin, original DINOv2 .pth, OpenAI and
timm CLIP image towers), loads it into a fresh model of another seed and
compares features: the loaded backbone must compute exactly what the source did.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from peft_core import backbones
from peft_core.errors import InputError

from ..methods.checks import BACKBONES, image_batch, tiny_model


def source(family: str = "vit", **kwargs) -> torch.nn.Module:
    """A tiny model whose every parameter is random (no zero biases or 1e-5 layer scales to hide a swap)."""
    if kwargs:
        name, base = BACKBONES[family]
        torch.manual_seed(0)
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=5, **{**base, **kwargs}).eval()
    else:
        model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def fresh(family: str = "vit", ckpt=None, **kwargs) -> torch.nn.Module:
    """A differently seeded model of the family, with ``ckpt`` loaded through the public entry point."""
    name, base = BACKBONES[family]
    torch.manual_seed(99)
    return backbones.build(name, ckpt, 5, kwargs={**base, **kwargs}).eval()


def assert_same_features(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = image_batch(a)
    with torch.no_grad():
        torch.testing.assert_close(b.forward_features(x), a.forward_features(x), atol=1e-5, rtol=1e-5)


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --- Google .npz ----------------------------------------------------------------------------------


def write_npz(model: torch.nn.Module, path, extra: dict | None = None) -> None:
    arrays = backbones.to_npz_layout(model)
    np.savez(path, **arrays, **(extra or {}))


def test_npz_round_trips_to_equal_logits(tmp_path):
    src = source("vit")
    # the released ViT-B_16.npz also holds a 21k-class head and a pre-logits layer: both ignored
    extra = {"head/kernel": np.zeros((64, 11), np.float32), "head/bias": np.zeros(11, np.float32),
             "pre_logits/kernel": np.zeros((64, 64), np.float32)}  # fmt: skip
    write_npz(src, tmp_path / "vit.npz", extra)
    got = fresh("vit", tmp_path / "vit.npz")
    assert_same_features(src, got)
    got.head.load_state_dict(src.head.state_dict())
    x = image_batch(src)
    with torch.no_grad():
        torch.testing.assert_close(got(x), src(x), atol=1e-5, rtol=1e-5)


def test_npz_layout_uses_the_google_key_names(tmp_path):
    keys = set(backbones.to_npz_layout(source("vit")))
    assert {"embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding",
            "Transformer/encoderblock_3/MultiHeadDotProductAttention_1/query/kernel",
            "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias", "Transformer/encoder_norm/scale"} <= keys  # fmt: skip
    arrays = backbones.to_npz_layout(source("vit"))
    assert arrays["embedding/kernel"].shape == (8, 8, 3, 64)  # HWIO
    assert arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (64, 2, 32)


def test_npz_of_a_deeper_model_is_refused_with_its_extra_keys(tmp_path):
    write_npz(source("vit", depth=6), tmp_path / "deep.npz")
    with pytest.raises(InputError) as exc:
        fresh("vit", tmp_path / "deep.npz")
    msg = one_line_error(exc)
    assert "deep.npz: does not fit VisionTransformer" in msg
    assert "unexpected 32: Transformer/encoderblock_4/" in msg


def test_npz_of_a_shallower_model_lists_missing_keys(tmp_path):
    write_npz(source("vit", depth=2), tmp_path / "shallow.npz")
    with pytest.raises(InputError) as exc:
        fresh("vit", tmp_path / "shallow.npz")
    assert "missing 32: Transformer/encoderblock_2/" in one_line_error(exc)


def test_npz_of_another_width_lists_wrong_shapes(tmp_path):
    write_npz(source("vit", embed_dim=128), tmp_path / "wide.npz")
    with pytest.raises(InputError) as exc:
        fresh("vit", tmp_path / "wide.npz")
    assert "wrong shape" in one_line_error(exc) and "(128,) != (64,)" in str(exc.value)


def test_npz_into_a_model_with_tensors_it_cannot_fill(tmp_path):
    write_npz(source("vit"), tmp_path / "vit.npz")
    with pytest.raises(InputError) as exc:
        fresh("dinov2_reg", tmp_path / "vit.npz")
    assert "reg_token" in one_line_error(exc)


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive")
    with pytest.raises(InputError, match="bad.npz: cannot read .npz"):
        fresh("vit", tmp_path / "bad.npz")


# --- timm / HF hub files ----------------------------------------------------------------------------


def test_safetensors_in_timm_layout(tmp_path):
    src = source("vit")
    save_file(backbone_state(src), str(tmp_path / "model.safetensors"))
    assert_same_features(src, fresh("vit", tmp_path / "model.safetensors"))


def test_bin_with_a_foreign_head_and_wrapper(tmp_path):
    """A hub ``pytorch_model.bin`` keeps its 1000-class head: it is not loaded, the new one stays."""
    src = source("vit")
    state = src.state_dict()
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    torch.save({"model": state, "epoch": 3}, tmp_path / "pytorch_model.bin")
    got = fresh("vit", tmp_path / "pytorch_model.bin")
    assert_same_features(src, got)
    assert got.head.weight.shape == (5, 64) and got.head.weight.abs().sum() > 0


def test_checkpoint_of_a_deeper_model_is_refused(tmp_path):
    save_file(backbone_state(source("vit", depth=6)), str(tmp_path / "deep.safetensors"))
    with pytest.raises(InputError) as exc:
        fresh("vit", tmp_path / "deep.safetensors")
    msg = one_line_error(exc)
    assert "deep.safetensors: does not fit VisionTransformer (unexpected 24: blocks.4." in msg
    assert msg.count("blocks.") == 5 and msg.endswith(", ...)")  # a few keys, not all 24


def test_checkpoint_of_another_architecture_lists_missing_and_wrong_shapes(tmp_path):
    save_file(backbone_state(source("vit", embed_dim=128, depth=2)), str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError) as exc:
        fresh("vit", tmp_path / "other.safetensors")
    msg = one_line_error(exc)
    assert "missing 24: blocks.2." in msg and "wrong shape" in msg


def test_pickle_with_code_is_refused_by_weights_only(tmp_path):
    torch.save({"model": backbone_state(source("vit")), "cfg": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(InputError) as exc:
        fresh("vit", tmp_path / "evil.pth")
    assert "evil.pth: cannot read checkpoint (UnpicklingError" in one_line_error(exc)


class Payload:
    """Any non-tensor object: ``weights_only=True`` must refuse to unpickle it."""


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match="checkpoint file not found"):
        fresh("vit", tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="checkpoint file not found"):
        fresh("vit", tmp_path / "nope.npz")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown checkpoint format '.h5'"):
        fresh("vit", tmp_path / "w.h5")


# --- DINOv2 (original facebookresearch layout) -----------------------------------------------------


def to_dinov2_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm DINOv2-with-registers -> the keys of the released ``dinov2_*_reg4_pretrain.pth``.

    The original model adds a position embedding to the class token and keeps
    registers outside the position table; timm folds the class position into
    ``cls_token`` (no_embed_class). The inverse: split an arbitrary class
    position back out.
    """
    state = backbone_state(model)
    cls_pos = 0.1 * torch.randn(1, 1, state["cls_token"].shape[-1], generator=torch.Generator().manual_seed(5))
    state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["cls_token"] = state["cls_token"] - cls_pos
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def test_dinov2_pth_with_registers(tmp_path):
    src = source("dinov2_reg")
    assert src.reg_token.shape[1] == 4 and any("ls1.gamma" in k for k in src.state_dict())
    torch.save(to_dinov2_layout(src), tmp_path / "dinov2_reg4_pretrain.pth")
    assert_same_features(src, fresh("dinov2_reg", tmp_path / "dinov2_reg4_pretrain.pth"))


def test_dinov2_position_table_is_resampled_to_the_model_grid(tmp_path):
    """Released DINOv2 files are at 518 px (37x37 patches); models here run at another size."""
    big = source("dinov2_reg", img_size=42)  # 6x6 patches
    torch.save(to_dinov2_layout(big), tmp_path / "dinov2.pth")
    got = fresh("dinov2_reg", tmp_path / "dinov2.pth")  # 4x4 patches
    assert got.pos_embed.shape == (1, 16, 64)
    torch.testing.assert_close(got.blocks[0].attn.qkv.weight, big.blocks[0].attn.qkv.weight)


# --- CLIP image towers ------------------------------------------------------------------------------


def test_clip_image_tower_in_timm_layout(tmp_path):
    src = source("clip")
    assert "norm_pre.weight" in src.state_dict()
    save_file(backbone_state(src), str(tmp_path / "open_clip_model.safetensors"))
    assert_same_features(src, fresh("clip", tmp_path / "open_clip_model.safetensors"))


def to_openai_clip_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm CLIP tower -> OpenAI's ``visual.*`` keys, with a text-tower tensor that must be ignored."""
    renames = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
               ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
               ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]  # fmt: skip
    out = {"token_embedding.weight": torch.zeros(10, 8)}
    for k, v in backbone_state(model).items():
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        elif k.startswith("norm."):
            out["visual.ln_post." + k[len("norm.") :]] = v
        else:
            for old, new in renames:
                k = k.replace(old, new)
            out["visual." + k] = v
    out["visual.proj"] = torch.zeros(model.embed_dim, 32)  # projection into the joint space: the old head
    return out


def test_clip_image_tower_in_openai_layout(tmp_path):
    src = source("clip")
    torch.save(to_openai_clip_layout(src), tmp_path / "ViT-B-16.pt")
    assert_same_features(src, fresh("clip", tmp_path / "ViT-B-16.pt"))


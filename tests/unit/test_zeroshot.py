"""The CLIP zero-shot head equals the L2-normalised text embeddings (tiny random open_clip model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_core.errors import InputError

open_clip = pytest.importorskip("open_clip")

from peft_core.zeroshot import load_clip, read_class_names, text_head  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip():
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model.eval(), SimpleTokenizer()  # the BPE vocabulary ships with open_clip


def test_head_is_the_normalised_text_embeddings(tiny_clip):
    model, tok = tiny_clip
    names = ["cat", "dog", "traffic light"]
    head = text_head(model, tok, names)
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tok([f"a photo of a {n}." for n in names])), dim=-1)
    assert head.shape == (3, 16)
    torch.testing.assert_close(head, expected)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(3))


def test_several_templates_average_then_normalise(tiny_clip):
    model, tok = tiny_clip
    templates = ["a photo of a {}.", "a sketch of a {}."]
    head = text_head(model, tok, ["cat"], templates)
    with torch.no_grad():
        e = F.normalize(model.encode_text(tok([t.format("cat") for t in templates])), dim=-1)
    torch.testing.assert_close(head[0], F.normalize(e.mean(0), dim=-1))
    with pytest.raises(InputError, match="templates: each must contain"):
        text_head(model, tok, ["cat"], ["a photo"])


def test_local_files_only(tmp_path):
    with pytest.raises(InputError, match="CLIP checkpoint not found"):
        load_clip("ViT-B-32", tmp_path / "missing.bin")
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    assert read_class_names(tmp_path / "names.txt") == ["cat", "dog"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    from peft_core.cli import main

    (tmp_path / "names.txt").write_text("cat\n")
    args = ["zeroshot-head", "--model", "ViT-B-16", "--checkpoint", str(tmp_path / "no.bin"),
            "--classes", str(tmp_path / "names.txt"), "--out", str(tmp_path / "h.safetensors")]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("no.bin: CLIP checkpoint not found (nothing is downloaded)")

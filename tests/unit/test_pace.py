"""PACE: consistency regularisation under multiplicative noise on adapter outputs (peft_core/pace.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from peft_core.cells import cell_hash
from peft_core.config import load_study
from peft_core.sections import PaceConfig
from peft_core.errors import InputError
from peft_core.methods import list_methods
from peft_core.pace import PACE_METHODS, Pace, noise_points
from peft_core.train import build_model, run_cell, train

from .. import toycell
from ..methods.checks import apply, image_batch, tiny_model

REPO = Path(__file__).resolve().parents[2]
ON = PaceConfig(sigma=0.5, weight=1.0)


def demo(methods: dict, pace: dict | None) -> dict:
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["methods"] = methods
    if pace is not None:
        raw["train"]["pace"] = pace
    return raw


# ------------------------------------------------------------------ identity


def test_off_is_invisible_in_every_dump_and_id():
    spec = toycell.spec("lora")
    assert "pace" not in spec.model_dump(mode="json") and '"pace"' not in spec.canonical_json()
    assert spec.model_copy(update={"pace": None}).cell_id == spec.cell_id == cell_hash(spec.identity())
    raw = demo({"lora": {"rank": 8}}, None)
    plain = [c.cell_id for c in load_study(raw).tuning_cells("digits", "lora")]
    raw["train"]["pace"] = None
    assert [c.cell_id for c in load_study(raw).tuning_cells("digits", "lora")] == plain


def test_on_is_part_of_the_id_and_survives_the_spec_json():
    spec = toycell.spec("lora")
    on = spec.model_copy(update={"pace": ON})
    assert on.cell_id != spec.cell_id
    assert on.model_copy(update={"pace": PaceConfig(sigma=0.5, weight=2.0)}).cell_id != on.cell_id
    assert on.model_copy(update={"pace": PaceConfig(sigma=1.0, weight=1.0)}).cell_id != on.cell_id
    assert type(on).model_validate_json(on.canonical_json()) == on
    study = load_study(demo({"lora": {"rank": 8}, "adapter": {"bottleneck": 8}}, {"sigma": 0.5, "weight": 1.0}))
    cells = study.tuning_cells("digits", "lora")
    assert all(c.pace == ON for c in cells)
    assert study.final_cell(cells[0], 1).pace == ON


@pytest.mark.parametrize("method", ["linear", "full", "bitfit"])
def test_methods_without_adapter_outputs_are_refused_in_one_line(method):
    raw = demo({"lora": {"rank": 8}, method: {}}, {"sigma": 0.5, "weight": 1.0})
    with pytest.raises(InputError) as err:
        load_study(raw)
    msg = str(err.value)
    assert "\n" not in msg and f"'{method}'" in msg and msg.startswith("train.pace: ")
    with pytest.raises(InputError, match=f"^train.pace: method '{method}'"):  # the engine, before any data is read
        run_cell(toycell.spec(method, {}).model_copy(update={"pace": ON}), "absent.pt", "absent.pt", None, "out")


def test_bad_pace_values_are_refused():
    with pytest.raises(InputError, match=r"^train\.pace\.sigma: "):
        load_study(demo({"lora": {"rank": 8}}, {"sigma": -1.0, "weight": 1.0}))


def test_pace_methods_are_exactly_those_with_noise_points():
    with_points = set()
    for name in list_methods():
        try:
            model = apply(tiny_model("vit"), name)
        except (ImportError, ValueError, TypeError):
            continue  # a method that needs an optional dependency or other hyper-parameters
        if noise_points(model):
            with_points.add(name)
    assert with_points == set(PACE_METHODS)


# ------------------------------------------------------------------ noise


def _randomised_lora(seed: int = 0) -> torch.nn.Module:
    model = apply(tiny_model("vit"), "lora", rank=2, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n.rsplit(".", 1)[-1]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_noise_is_only_on_adapter_outputs():
    model = apply(tiny_model("vit"), "lora", rank=2, dropout=0.0)  # B = 0: every adapter output is 0
    x = image_batch(model, n=4)
    paths = [p for p, _ in noise_points(model)]
    assert paths and all(p.endswith(".update") for p in paths)
    pace = Pace(model, "lora", sigma=1.0, weight=1.0, seed=0)
    model.train()
    _, _, reg = pace.loss(model, x, torch.zeros(4, dtype=torch.long), step=0)
    assert reg == 0  # the frozen path is untouched: zero adapter output times any noise is zero


def test_two_passes_differ_and_the_regulariser_is_positive():
    model = _randomised_lora()
    x = image_batch(model, n=4)
    pace = Pace(model, "lora", sigma=0.5, weight=1.0, seed=0)
    model.train()
    loss, logits, reg = pace.loss(model, x, torch.zeros(4, dtype=torch.long), step=0)
    assert reg > 0 and loss.requires_grad
    again = pace.loss(model, x, torch.zeros(4, dtype=torch.long), step=0)
    assert torch.equal(again[1], logits) and again[2] == reg  # the noise is a function of (seed, step)
    assert pace.loss(model, x, torch.zeros(4, dtype=torch.long), step=1)[2] != reg


def test_noise_is_per_sample_per_channel():
    model = _randomised_lora()
    pace = Pace(model, "lora", sigma=0.5, weight=1.0, seed=0)
    seen = []
    _, point = noise_points(model)[0]
    point.register_forward_hook(lambda m, i, o: seen.append(o / i[0]))
    model.train()
    pace.loss(model, image_batch(model, n=3), torch.zeros(3, dtype=torch.long), step=0)
    z = seen[0]  # (batch, tokens, channels): one value per (sample, channel), shared by the tokens
    assert torch.allclose(z, z[:, :1].expand_as(z)) and not torch.allclose(z, z[:1].expand_as(z))


def test_eval_is_noise_free():
    model = _randomised_lora()
    x = image_batch(model, n=4)
    model.eval()
    with torch.no_grad():
        clean = model(x)
        pace = Pace(model, "lora", sigma=1.0, weight=1.0, seed=0)
        assert torch.equal(model(x), clean)
        model.train()
        assert not torch.equal(model(x), model(x))  # hooks active in train mode (dropout 0, drop-path 0)
        model.eval()
        assert torch.equal(model(x), clean)
    pace.remove()


# ------------------------------------------------------------------ training


def _train(tmp_path: Path, spec) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(spec.seed)
    split = {k: torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in ("train",)}["train"]
    model = build_model(spec, tmp_path / "backbone.safetensors", torch.device("cpu"))
    out = train(model, spec, split["images"], split["labels"], log=lambda msg: None)
    return out, model


def test_sigma_zero_trains_bit_identically_to_the_plain_cell(tmp_path):
    toycell.write_inputs(tmp_path)
    spec = toycell.spec("lora", {"rank": 2}, epochs=2)  # LoRA dropout 0.1 and drop-path 0.1: masks shared
    plain, m0 = _train(tmp_path, spec)
    zero, m1 = _train(tmp_path, spec.model_copy(update={"pace": PaceConfig(sigma=0.0, weight=1.0)}))
    assert zero.final_loss == plain.final_loss and zero.final_accuracy == plain.final_accuracy
    for (n, a), (_, b) in zip(m0.state_dict().items(), m1.state_dict().items()):
        assert torch.equal(a, b), n
    noisy, m2 = _train(tmp_path, spec.model_copy(update={"pace": ON}))
    assert noisy.final_loss != plain.final_loss
    assert not all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m2.state_dict().values()))
    assert not any(h for _, m in noise_points(m2) for h in m._forward_hooks.values())  # hooks removed after training


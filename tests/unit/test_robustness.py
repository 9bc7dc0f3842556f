"""Robustness under shift: config (layouts, shifted sets, class maps), subset-class scoring, WiSE rows, report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from peft_core.cli import main
from peft_core.config import load_study
from peft_core.errors import InputError
from peft_core.results import write_torch
from peft_core.robustness import EvalSet, build_plan, cell_rows, restricted_argmax
from peft_core.robustness_report import build_robustness_report, curve_frame

from .. import toycell

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
# Cell ids of tests/configs/tiny.yaml's tuning cells without layouts or shifted sets
# (ids since precision, schedule, init and interpolation joined the spec): neither
# a data layout nor a shifted set may change a cell's identity.
# (the linear cell id moved when LinearHP gained `norm`, default "none")
TINY_IDS = ["da4823d5d5", "6d91b51956", "27e97c26c0"]


def tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def ids(raw: dict) -> list[str]:
    s = load_study(raw)
    return [c.cell_id for d in s.dataset_names() for m in s.method_names() for c in s.tuning_cells(d, m)]


# ------------------------------------------------------------------ config


def test_layout_root_and_shifted_sets_leave_cell_ids_unchanged():
    raw = tiny()
    assert ids(raw) == TINY_IDS
    bare = copy.deepcopy(raw)
    del bare["datasets"]["digits"]["ood"], bare["robustness"]
    assert ids(bare) == TINY_IDS
    explicit = copy.deepcopy(bare)
    explicit["datasets"]["digits"].update(layout="vtab", root=raw["data"]["root"])
    assert ids(explicit) == TINY_IDS
    study = load_study(explicit)
    assert study.data_location("digits") == (raw["data"]["root"], "vtab")
    assert load_study(bare).data_location("digits") == (raw["data"]["root"], "vtab")


def test_dataset_layout_and_root_are_read():
    raw = tiny()
    raw["datasets"]["digits"].update(layout="imagefolder", root="/elsewhere")
    assert load_study(raw).data_location("digits") == ("/elsewhere", "imagefolder")


def test_class_map_from_a_file_with_comments(tmp_path):
    (tmp_path / "map.txt").write_text("# ID class of each label\n3\n\n1  # second\n")
    raw = tiny()
    raw["datasets"]["digits"]["ood"] = {"sub": {"root": "x", "class_map": str(tmp_path / "map.txt")}}
    study = load_study(raw)
    assert study.ood_class_map("digits", "sub") == [3, 1]
    assert study.ood_num_classes("digits", "sub") == 2
    assert build_plan(study, "digits")["sets"]["sub"] == {"distribution": "ood", "split": "test", "class_map": [3, 1]}
    assert study.robustness_alphas() == [0.0, 0.5, 1.0]


def test_shipped_imagenet_class_maps():
    study = load_study(REPO / "config" / "robustness.yaml")
    a, r = study.ood_class_map("imagenet", "imagenet_a"), study.ood_class_map("imagenet", "imagenet_r")
    assert len(a) == len(r) == 200 and a == sorted(a) and r == sorted(r) and a[:3] == [6, 11, 13] and r[:3] == [1, 2, 4]
    v2 = study.ood_class_map("imagenet", "imagenet_v2")
    assert sorted(v2) == list(range(1000)) and v2[:4] == [0, 1, 10, 100]
    assert study.ood_class_map("imagenet", "imagenet_sketch") is None
    assert study.ood_num_classes("imagenet", "imagenet_sketch") == 1000


@pytest.mark.parametrize(
    "ood, message",
    [
        ({"class_map": [0, 10]}, "datasets.digits.ood.bad.class_map[1]: class 10 outside digits's 0..9"),
        ({"class_map": [2, 2]}, "datasets.digits.ood.bad.class_map[1]: class 2 already mapped by entry 0"),
        ({"class_map": [0, 1, 2], "num_classes": 4}, "datasets.digits.ood.bad.class_map: 3 entries, but num_classes is 4"),
        ({"class_map": "no/such/map.txt"}, "datasets.digits.ood.bad.class_map: no/such/map.txt: class map file not found"),
        ({"num_classes": 5}, "datasets.digits.ood.bad.num_classes: 5 classes but digits has 10; give a class_map"),
        ({"class_map": [-1]}, "datasets.digits.ood.bad.class_map.list[int][0]: Input should be greater than or equal to 0"),
        ({"layout": "folders"}, "datasets.digits.ood.bad.layout: Input should be 'vtab', 'imagefolder' or 'csv'"),
        ({"generator": "demo", "layout": "csv"}, "datasets.digits.ood.bad.layout: a demo-generated set is written in the vtab layout"),
        ({"colour": 1}, "datasets.digits.ood.bad.colour: unknown field"),
    ],
)
def test_bad_shifted_set_is_a_one_line_error_naming_the_field(ood, message):
    raw = tiny()
    raw["datasets"]["digits"]["ood"] = {"bad": {"root": "somewhere", **ood}}
    with pytest.raises(InputError) as err:
        load_study(raw)
    assert str(err.value).startswith(message.split(" (got")[0].replace(".list[int]", "")), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_map_file_line_and_reserved_name(tmp_path):
    (tmp_path / "map.txt").write_text("1\ntwo\n")
    raw = tiny()
    raw["datasets"]["digits"]["ood"] = {"sub": {"root": "x", "class_map": str(tmp_path / "map.txt")}}
    with pytest.raises(InputError, match=r"^datasets\.digits\.ood\.sub\.class_map: .*map\.txt:2: expected a non-negative"):
        load_study(raw)
    raw["datasets"]["digits"]["ood"] = {"id": {"root": "x"}}
    with pytest.raises(InputError, match=r"^datasets\.digits\.ood\.id: 'id' names the in-distribution"):
        load_study(raw)


@pytest.mark.parametrize(
    "alphas, message",
    [([0, 1.5], "robustness.alphas[1]: Input should be less than or equal to 1"), ([0.5, 0.5], "robustness.alphas: ")],
)
def test_bad_alphas(alphas, message):
    raw = tiny()
    raw["robustness"] = {"alphas": alphas}
    with pytest.raises(InputError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        load_study(raw)


def test_validate_cli_reports_the_field(tmp_path, capsys):
    raw = tiny()
    raw["datasets"]["digits"]["ood"] = {"bad": {"root": "x", "class_map": [0, 12]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err.strip() == (
        "peft-core: error: datasets.digits.ood.bad.class_map[1]: class 12 outside digits's 0..9"
    )


# ------------------------------------------------------------------ subset-class scoring


def test_restricted_argmax_on_a_subset_class_set():
    # 5 ID classes; the shifted set has 2: its label 0 is ID class 3, its label 1 is ID class 1.
    logits = torch.tensor(
        [
            [9.0, 1.0, 0.0, 2.0, 0.0],  # ID argmax 0 (not in the subset); within {3, 1}: class 3 -> label 0
            [0.0, 5.0, 0.0, 4.0, 9.0],  # within {3, 1}: class 1 -> label 1
            [0.0, 1.0, 0.0, 3.0, 0.0],  # class 3 -> label 0
        ]
    )
    assert restricted_argmax(logits, [3, 1]).tolist() == [0, 1, 0]
    assert restricted_argmax(logits, None).tolist() == [0, 4, 3]
    labels = torch.tensor([0, 1, 1])
    assert float((restricted_argmax(logits, [3, 1]) == labels).float().mean()) == pytest.approx(2 / 3)


# ------------------------------------------------------------------ WiSE rows of one cell


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A trained LoRA cell (mergeable) and a VPT cell (not), the ID eval split and a 2-class shifted set."""
    root = tmp_path_factory.mktemp("robust")
    toycell.write_inputs(root)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g)
    write_torch(root / "ood.pt", {"images": images, "labels": torch.arange(24) % 2})
    out = {"root": root}
    for method, hp in (("lora", {"rank": 2}), ("vpt_deep", {"num_prompts": 2})):
        cell = toycell.spec(method, hp, epochs=1)
        cell = cell.model_copy(update={"backbone": cell.backbone.model_copy(update={"checkpoint": str(root / "backbone.safetensors")})})
        from peft_core.train import run_cell

        run_cell(cell, root / "train.pt", root / "eval.pt", root / "backbone.safetensors", root / method,
                 threads=1, device="cpu", log=lambda m: None)  # fmt: skip
        out[method] = cell
    return out


def _sets(root: Path):
    from peft_core.robustness import load_eval

    sets = [EvalSet("id", "id", "val200", root / "eval.pt"), EvalSet("sub", "ood", "test", root / "ood.pt", (2, 0))]
    return [(es, load_eval(es)) for es in sets]


def test_cell_rows_endpoints_and_class_map(cells):
    from peft_core import backbones
    from peft_core.data import load_split
    from peft_core.merge import load_cell_model
    from peft_core.train import evaluate
    from peft_core.wise import head_keys

    root = cells["root"]
    rows = pd.DataFrame(cell_rows(root / "lora", _sets(root), [0.0, 0.5, 1.0]))
    assert sorted(set(rows.alpha)) == [0.0, 0.5, 1.0] and set(rows.eval_set) == {"id", "sub"}
    assert set(rows.n_classes[rows.eval_set == "sub"]) == {2} and bool(rows.mergeable.all())
    acc = {(r.alpha, r.eval_set): r.accuracy for r in rows.itertuples()}
    # alpha = 1: the fine-tuned model (its own ID predictions; on the shifted set, logits restricted to {2, 0})
    tuned = pd.read_parquet(root / "lora" / "predictions.parquet")
    assert acc[(1.0, "id")] == pytest.approx((tuned.pred == tuned.label).mean())
    spec, model = load_cell_model(root / "lora", None)
    ood = load_split(root / "ood.pt")
    z = evaluate(model, spec, ood.images)
    expected = (z[:, [2, 0]].argmax(1) == ood.labels).float().mean().item()
    assert acc[(1.0, "sub")] == pytest.approx(expected)
    # alpha = 0: the pre-trained backbone read out by the fine-tuned head
    plain = backbones.build(spec.backbone.model, spec.backbone.checkpoint, 3, 0.0, spec.backbone.kwargs)
    from safetensors.torch import load_file

    trained = load_file(str(root / "lora" / "trainable.safetensors"))
    plain.load_state_dict({k: v for k, v in trained.items() if k in head_keys(plain)}, strict=False)
    z0 = evaluate(plain, spec, ood.images)
    assert acc[(0.0, "sub")] == pytest.approx((z0[:, [2, 0]].argmax(1) == ood.labels).float().mean().item())
    ev = load_split(root / "eval.pt")
    assert acc[(0.0, "id")] == pytest.approx((evaluate(plain, spec, ev.images).argmax(1) == ev.labels).float().mean().item())


def test_non_mergeable_cell_gets_alpha_one_only(cells):
    root = cells["root"]
    rows = pd.DataFrame(cell_rows(root / "vpt_deep", _sets(root), [0.0, 0.5, 1.0]))
    assert list(rows.alpha) == [1.0, 1.0] and not rows.mergeable.any()
    tuned = pd.read_parquet(root / "vpt_deep" / "predictions.parquet")
    assert rows[rows.eval_set == "id"].accuracy.item() == pytest.approx((tuned.pred == tuned.label).mean())


def test_robustness_cli_errors_are_one_line(tmp_path, capsys):
    args = ["robustness", "--tables", "t.parquet", "--results", "r", "--plan", "{}", "--out", "o.parquet"]
    assert main([*args, "--eval", "id"]) == 2
    assert capsys.readouterr().err.strip() == "peft-core: error: --eval 'id': expected NAME=path"
    assert main([*args[:6], "not json", *args[7:], "--eval", f"id={TINY}"]) == 2
    assert capsys.readouterr().err.startswith("peft-core: error: --plan: not JSON")


def test_label_beyond_class_map_is_an_error(tmp_path):
    from peft_core.robustness import load_eval

    write_torch(tmp_path / "o.pt", {"images": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "labels": torch.tensor([0, 2])})
    with pytest.raises(InputError, match="label 2 of eval set 'sub' has no entry in its class_map"):
        load_eval(EvalSet("sub", "ood", "test", tmp_path / "o.pt", (1, 0)))


# ------------------------------------------------------------------ report


def _rows() -> pd.DataFrame:
    rows = []
    for method, mergeable in (("full", True), ("lora", True), ("vpt_deep", False)):
        for seed in (0, 1):
            for alpha in (0.0, 0.5, 1.0) if mergeable else (1.0,):
                for es, dist, split in (("id", "id", "test"), ("colour", "ood", "test"), ("sketch", "ood", "val")):
                    acc = 0.5 + 0.3 * alpha + (0.05 if dist == "id" else -0.1 * alpha) + 0.01 * seed
                    rows.append({"dataset": "digits", "method": method, "mergeable": mergeable, "cell": f"{method}{seed}",
                                 "seed": seed, "alpha": alpha, "eval_set": es, "distribution": dist, "split": split,
                                 "accuracy": acc, "n_eval": 100, "n_classes": 10})  # fmt: skip
    return pd.DataFrame(rows)


def test_curve_frame_means_over_seeds():
    c = curve_frame(_rows())
    r = c[(c.method == "lora") & (c.alpha == 0.5)].iloc[0]
    assert r.seeds == 2 and r["id"] == pytest.approx(0.5 + 0.15 + 0.05 + 0.005)
    assert r["ood_mean"] == pytest.approx(0.5 + 0.15 - 0.05 + 0.005)
    assert list(c[c.method == "vpt_deep"].alpha) == [1.0]
    assert list(dict.fromkeys(c.method)) == ["full", "lora", "vpt_deep"]
    assert list(c.columns[5:]) == ["id", "colour", "sketch", "ood_mean"]


def test_report_renders(tmp_path):
    tables = []
    for name, frame in _rows().groupby("seed"):
        frame.to_parquet(tmp_path / f"t{name}.parquet")
        tables.append(tmp_path / f"t{name}.parquet")
    build_robustness_report("demo", tables, tmp_path / "out")
    md = (tmp_path / "out" / "robustness.md").read_text()
    assert "## digits: ID `test` vs `colour` (test), `sketch` (val)" in md
    assert "| vpt_deep (not mergeable) |   1 |" in md and "OOD mean" in md
    page = (tmp_path / "out" / "robustness.html").read_text()
    # one inline figure per OOD set and their mean, each also saved as PDF, SVG and PNG
    assert page.count("<figure") == 3 and page.count("<svg") == 3
    for s in ("colour", "sketch", "ood_mean"):
        for fmt in ("pdf", "svg", "png"):
            assert (tmp_path / "out" / "figures" / f"wise_digits_{s}.{fmt}").stat().st_size > 0
    namespaces = ('xmlns="http://www.w3.org/2000/svg"', 'xmlns:xlink="http://www.w3.org/1999/xlink"')
    for ns in namespaces:  # namespace names, never fetched
        page = page.replace(ns, "")
    assert "<script" not in page.lower() and "http://" not in page
    assert len(pd.read_parquet(tmp_path / "out" / "robustness.parquet")) == len(_rows())

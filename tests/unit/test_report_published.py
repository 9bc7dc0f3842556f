"""Ours vs published compares like with like (peft_core/published.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from peft_core.published import PUBLISHED_AS, published_frame

REPO = Path(__file__).resolve().parents[2]
PUBLISHED = REPO / "config" / "published" / "mai2025_vtab1k.csv"  # the repo's copy of ../shared/reference/published


def _per(rows):
    return pd.DataFrame([{"method": m, "dataset": d, "config": json.dumps({**hp, "lr": 0.01, "weight_decay": 1e-4})}
                         for m, d, hp in rows])  # fmt: skip


def test_mapping_names_rows_of_the_published_table():
    rows = set(pd.read_csv(PUBLISHED).method)
    assert {to.row for to in PUBLISHED_AS.values()} <= rows
    assert PUBLISHED_AS["adapter"].row == "lora_p_adapter" and PUBLISHED_AS["adapter"].requires == {"init": ("lora_xavier",)}
    assert PUBLISHED_AS["houlsby"].row == "rand_h_adapter"


def test_adapter_is_compared_only_where_it_selected_the_lora_init():
    summ = pd.DataFrame([{"method": "adapter", "cifar100": 70.0, "dtd": 60.0}, {"method": "linear", "cifar100": 50.0, "dtd": 40.0},
                         {"method": "mine", "cifar100": 1.0, "dtd": 1.0}])  # fmt: skip
    pub = pd.DataFrame([{"method": "lora_p_adapter", "cifar100": 71.0, "dtd": 71.28, "mean19": 73.21},
                        {"method": "linear", "cifar100": 48.0, "dtd": 44.0, "mean19": 55.0}])  # fmt: skip
    per = _per([("adapter", "cifar100", {"init": "lora_xavier"}), ("adapter", "dtd", {"init": "xavier"})])
    tuned = {"adapter": {"init": {"zero", "xavier", "lora_xavier"}}}
    out = published_frame(summ, pub, ["cifar100", "dtd"], per, tuned).set_index("method")
    assert set(out.index) == {"adapter", "linear"}  # "mine" has no published row
    ad = out.loc["adapter"]
    assert (ad.published_as, ad.datasets, ad.ours, ad.published) == ("lora_p_adapter", 1, 70.0, 71.0)
    assert ad["diff"] == pytest.approx(-1.0)
    assert "init=lora_xavier" in ad.note and "ours tuned over init ∈ {lora_xavier, xavier, zero}" in ad.note
    lin = out.loc["linear"]
    assert (lin.datasets, lin.ours, lin.published, lin.note) == (2, 45.0, 46.0, "")


def test_never_selecting_the_published_config_is_not_compared():
    summ = pd.DataFrame([{"method": "adapter", "cifar100": 70.0, "dtd": 60.0}])
    pub = pd.DataFrame([{"method": "lora_p_adapter", "cifar100": 71.0, "dtd": 71.28}])
    per = _per([("adapter", "cifar100", {"init": "zero"}), ("adapter", "dtd", {"init": "xavier"})])
    out = published_frame(summ, pub, ["cifar100", "dtd"], per, {"adapter": {"init": {"zero", "xavier", "lora_xavier"}}})
    r = out.iloc[0]
    assert r.datasets == 0 and math.isnan(r.ours) and math.isnan(r["diff"]) and r.published == pytest.approx(71.14)
    assert r.note == "not comparable: published ran init=lora_xavier only, ours tuned over init ∈ {lora_xavier, xavier, zero}"
    # without our selection, a mapping that fixes hyper-parameters is never assumed to hold
    r = published_frame(summ, pub, ["cifar100", "dtd"]).iloc[0]
    assert r.datasets == 0 and math.isnan(r.ours) and "not comparable" in r.note


def test_real_table_like_with_like(tmp_path):
    pub = pd.read_csv(PUBLISHED)
    summ = pd.DataFrame([{"method": "houlsby", "cifar100": 70.0}, {"method": "ssf", "cifar100": 70.0}])
    per = _per([("houlsby", "cifar100", {"init": "xavier"}), ("ssf", "cifar100", {"init": "identity"})])
    out = published_frame(summ, pub, ["cifar100"], per, {"ssf": {"init": {"identity"}}}).set_index("method")
    assert out.loc["houlsby", "datasets"] == 1 and out.loc["houlsby", "published_as"] == "rand_h_adapter"
    assert out.loc["ssf", "datasets"] == 0 and out.loc["ssf", "note"] == "not comparable: published ran init=normal only, ours tuned over init ∈ {identity}"

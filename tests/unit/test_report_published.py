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


# ---------------------------------------------------------------- V-PEFT Bench's tables
VPEFT_VTAB = REPO / "config" / "published" / "vpeft_bench_vtab1k.csv"
VPEFT_FGVC = REPO / "config" / "published" / "vpeft_bench_fgvc.csv"


def test_vpeft_tables_are_the_shared_reference_copies():
    shared = REPO / ".." / "shared" / "reference" / "published"
    for ours in (VPEFT_VTAB, VPEFT_FGVC):
        if (shared / ours.name).is_file():
            assert ours.read_bytes() == (shared / ours.name).read_bytes()


def test_each_table_gets_its_own_mapping():
    from peft_core.published import VPEFT_AS, mapping_for

    assert mapping_for(pd.read_csv(PUBLISHED)) is PUBLISHED_AS
    assert mapping_for(pd.read_csv(VPEFT_VTAB)) is VPEFT_AS
    assert mapping_for(pd.read_csv(VPEFT_FGVC)) is VPEFT_AS
    assert mapping_for(pd.DataFrame({"method": ["nobody"]})) == {}
    rows = set(pd.read_csv(VPEFT_VTAB).method) | set(pd.read_csv(VPEFT_FGVC).method)
    assert {to.row for to in VPEFT_AS.values()} <= rows
    # rows whose function differs from ours are not mapped (see the comment above VPEFT_AS)
    assert not {"lora", "fact_tt", "fact_tk", "repadapter", "houlsby", "convpass", "vqt"} & set(VPEFT_AS)


# our method at the values its V-PEFT row fixes -> that row's params column (millions, 2 decimals);
# head: the mean head a row counts (Hydra, Prefix: their source tables count it), else 0
_VTAB_HEAD, _FGVC_HEAD = 769 * 940 / 19, 769 * 1173 / 5
VPEFT_COUNTS = [
    ("adapter", {"bottleneck": 8}, VPEFT_VTAB, 0),
    ("adaptformer", {"bottleneck": 8}, VPEFT_VTAB, 0),
    ("bitfit", {}, VPEFT_VTAB, 0),
    ("ssf", {"init": "normal"}, VPEFT_VTAB, 0),
    ("linear", {}, VPEFT_VTAB, 0),
    ("hydra", {"rank": 2}, VPEFT_VTAB, _VTAB_HEAD),
    ("dtl", {"rank": 2, "beta": 100.0}, VPEFT_VTAB, 0),
    ("last", {"rank": 18}, VPEFT_VTAB, 0),
    ("lst", {"reduction": 8}, VPEFT_VTAB, 0),
    ("prefix", {"length": 10}, VPEFT_FGVC, _FGVC_HEAD),
]


@pytest.mark.parametrize("name, hp, table, head", VPEFT_COUNTS, ids=[r[0] for r in VPEFT_COUNTS])
def test_vpeft_mapping_is_like_with_like_in_size(name, hp, table, head):
    import timm
    import torch

    from peft_core.methods import get_method
    from peft_core.methods._common import count_trainable
    from peft_core.published import VPEFT_AS

    to = VPEFT_AS[name]
    assert set(to.requires) <= set(hp) and all(hp[k] in v for k, v in to.requires.items())
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    method = get_method(name)
    n = count_trainable(method.apply(model, method.hparams(**hp))) + head
    published = pd.read_csv(table).set_index("method").loc[to.row, "params_m"]
    assert round(n / 1e6, 2) == pytest.approx(float(published))


def test_vpeft_table_compares_only_the_fixed_configuration():
    pub = pd.read_csv(VPEFT_VTAB)
    summ = pd.DataFrame([{"method": "adapter", "cifar100": 70.0, "dtd": 60.0},
                         {"method": "adaptformer", "cifar100": 70.0, "dtd": 60.0},
                         {"method": "lora", "cifar100": 70.0, "dtd": 60.0},
                         {"method": "hydra", "cifar100": 73.0, "dtd": 70.0}])  # fmt: skip
    per = _per([("adapter", "cifar100", {"bottleneck": 8}), ("adapter", "dtd", {"bottleneck": 32}),
                ("adaptformer", "cifar100", {"bottleneck": 16}), ("adaptformer", "dtd", {"bottleneck": 4}),
                ("hydra", "cifar100", {"rank": 2}), ("hydra", "dtd", {"rank": 2})])  # fmt: skip
    tuned = {"adapter": {"bottleneck": {4, 8, 16, 32, 64}}, "adaptformer": {"bottleneck": {4, 16, 32}}}
    out = published_frame(summ, pub, ["cifar100", "dtd"], per, tuned).set_index("method")
    assert set(out.index) == {"adapter", "adaptformer", "hydra"}  # LoRA is not mapped
    assert (out.loc["adapter", "published_as"], out.loc["adapter", "datasets"]) == ("Adapter", 1)
    assert out.loc["adapter", "published"] == pytest.approx(69.2) and "bottleneck=8" in out.loc["adapter", "note"]
    assert out.loc["adaptformer", "datasets"] == 0
    assert out.loc["adaptformer", "note"].startswith("not comparable: published ran bottleneck=8 only")
    assert (out.loc["hydra", "datasets"], out.loc["hydra", "published"]) == (2, pytest.approx((72.7 + 72.0) / 2))

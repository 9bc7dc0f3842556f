"""config/robustness.yaml validates and plans (``snakemake -n``) on a stub data tree."""

from __future__ import annotations

import yaml

from peft_core.config import load_study
from peft_core.packs import group_into_packs

from .smk import REPO, run_in_subprocess

CONFIG = REPO / "config" / "robustness.yaml"


def stub_tree(root, cfg: dict) -> dict:
    """Empty split listings, class folders and checkpoint under ``root``; the config pointed at them."""
    ds = cfg["datasets"]["imagenet"]
    cfg["data"]["root"] = str(root / "imagenet-fewshot")
    for key in ("tune_train", "tune_eval", "final_train", "final_eval"):
        path = root / "imagenet-fewshot" / "imagenet" / f"{cfg['data'][key]}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("path,label\n")
    for name, ood in ds["ood"].items():
        ood["root"] = str(root / "ood" / name)
        (root / "ood" / name / ood["split"]).mkdir(parents=True)
        if "class_map" in ood:  # relative to the repository root, the usual working directory
            ood["class_map"] = str(REPO / ood["class_map"])
    cfg["backbone"]["checkpoint"] = str(root / "ViT-B_16.npz")
    (root / "ViT-B_16.npz").write_bytes(b"")
    return cfg


def test_robustness_study_validates_and_plans(tmp_path):
    study = load_study(CONFIG)
    assert study.robustness_alphas() == [round(i / 10, 1) for i in range(11)]
    cfg = stub_tree(tmp_path / "stub", yaml.safe_load(CONFIG.read_text()))
    (tmp_path / "robustness.yaml").write_text(yaml.safe_dump(cfg))
    jobs = run_in_subprocess(tmp_path, tmp_path / "robustness.yaml", dryrun=True)
    rules = [j["rule"] for j in jobs]
    packs = [group_into_packs(study.tuning_cells("imagenet", m)) for m in study.method_names()]
    assert rules.count("train_pack") == sum(len(p) for p in packs)
    assert rules.count("train_final") == len(study.method_names())  # the whole DAG is planned up front
    # csv layout: the two tuning splits and the two final-run splits (the ID test split is one of them)
    assert rules.count("cache_split_layout") == 4 and "cache_split" not in rules
    ood = sorted(out.rsplit("/", 1)[1] for j in jobs if j["rule"] == "cache_ood" for out in j["output"] if out.endswith(".safetensors"))
    assert ood == ["imagenet_a_224px_bicubic.safetensors", "imagenet_r_224px_bicubic.safetensors", "imagenet_sketch_224px_bicubic.safetensors", "imagenet_v2_224px_bicubic.safetensors"]
    assert {"robustness", "robustness_report"} <= set(rules)


def test_manyshot_study_validates_and_plans(tmp_path):
    """config/manyshot.yaml: the same rules, one pack per method configuration and size."""
    config = REPO / "config" / "manyshot.yaml"
    load_study(config)
    cfg = yaml.safe_load(config.read_text())
    # the smallest and the full size of each data set (all 16 sizes plan the same rules, 2x slower)
    names = list(cfg["datasets"])
    fulls = [n for n in names if n.endswith("_full")]
    keep = set(fulls) | {next(m for m in names if m.startswith(n.removesuffix("_full"))) for n in fulls}
    cfg["datasets"] = {n: s for n, s in cfg["datasets"].items() if n in keep}
    assert len(cfg["datasets"]) == 6
    root = tmp_path / "stub"
    cfg["data"]["root"] = str(root)
    for name in cfg["datasets"]:
        for key in ("tune_train", "tune_eval", "final_train", "final_eval"):
            path = root / name / f"{cfg['data'][key]}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("path,label\n")
    cfg["backbone"]["checkpoint"] = str(tmp_path / "ViT-B_16.npz")
    (tmp_path / "ViT-B_16.npz").write_bytes(b"")
    (tmp_path / "manyshot.yaml").write_text(yaml.safe_dump(cfg))
    study = load_study(tmp_path / "manyshot.yaml")
    jobs = run_in_subprocess(tmp_path, tmp_path / "manyshot.yaml", dryrun=True)
    rules = [j["rule"] for j in jobs]
    expected = sum(len(group_into_packs(study.tuning_cells(d, m))) for d in study.dataset_names() for m in study.method_names())
    assert rules.count("train_pack") == expected
    assert rules.count("select_config") == rules.count("train_final") == len(study.dataset_names()) * len(study.method_names())

"""Study config validation: one line naming the field path, before any job runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from peft_core.config import load_study
from peft_core.grids import study_json_schema
from peft_core.errors import InputError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "config").glob("*.yaml")) + sorted((REPO / "tests" / "configs").glob("*.yaml"))


@pytest.fixture
def demo() -> dict:
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["methods"]["lora"] = {"rank": [1, 8]}  # the tests below assume the shared lr grid
    raw["train"]["lr"] = [0.001, 0.01]
    return raw


def error_of(cfg: dict) -> str:
    with pytest.raises(InputError) as err:
        load_study(cfg)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    study = load_study(path)
    assert study.dataset_names() and study.method_names()


def test_wrong_type_names_the_field(demo):
    demo["methods"]["lora"]["rank"] = ["eight"]
    assert error_of(demo).startswith("methods.lora.rank[0]: ")


def test_out_of_range_names_the_field(demo):
    demo["methods"]["lora"]["rank"] = [0, 8]
    assert error_of(demo) == "methods.lora.rank[0]: Input should be greater than or equal to 1 (got 0)"


def test_unknown_method_lists_known(demo):
    demo["methods"]["lorax"] = {}
    msg = error_of(demo)
    assert msg.startswith("methods.lorax: unknown method (known: ") and "lora" in msg


def test_unknown_field_is_rejected(demo):
    demo["train"]["learning_rate"] = [0.1]
    assert error_of(demo) == "train.learning_rate: unknown field"


def test_unknown_method_hyper_parameter_is_rejected(demo):
    demo["methods"]["lora"]["rnak"] = [4]
    assert error_of(demo) == "methods.lora.rnak: unknown field"


def test_bad_group_names_the_dataset(demo):
    demo["datasets"]["digits"]["group"] = "natrual"
    assert error_of(demo).startswith("datasets.digits.group: ")


def test_selecting_on_the_test_split_is_refused(demo):
    demo["data"]["tune_eval"] = "test"
    assert "must not be used for tuning" in error_of(demo)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_study(tmp_path / "nope.yaml")


def test_scalar_is_a_one_point_grid(demo):
    demo["methods"]["lora"] = {"rank": 4}
    study = load_study(demo)
    assert [c.hparams["rank"] for c in study.tuning_cells("digits", "lora")] == [4, 4]  # x 2 lr


def test_tuning_cells_cross_method_grid_with_optimiser_grid(demo):
    study = load_study(demo)
    cells = study.tuning_cells("digits", "lora")
    assert [(c.hparams["rank"], c.lr) for c in cells] == [(1, 0.001), (1, 0.01), (8, 0.001), (8, 0.01)]
    assert {c.train_split for c in cells} == {"train800"} and {c.eval_split for c in cells} == {"val200"}


def test_schema_file_is_in_sync_with_the_models():
    shipped = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert shipped == json.loads(json.dumps(study_json_schema())), (
        "regenerate: peft-core schema --out workflow/schemas/config.schema.yaml"
    )


def test_schema_accepts_shipped_configs_and_rejects_typos(demo):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    validate(copy.deepcopy(demo), schema)
    demo["train"]["learning_rate"] = [0.1]
    with pytest.raises(WorkflowError):
        validate(demo, schema)


def test_per_method_optimiser_grid_overrides_the_shared_one(demo):
    demo["methods"]["full"] = {"lr": [1e-4, 5e-4]}
    study = load_study(demo)
    assert [c.lr for c in study.tuning_cells("digits", "full")] == [1e-4, 5e-4]
    assert [c.lr for c in study.tuning_cells("digits", "lora")] == [0.001, 0.01, 0.001, 0.01]
    demo["methods"]["full"] = {"lr": [0]}
    assert error_of(demo).startswith("methods.full.lr[0]: ")

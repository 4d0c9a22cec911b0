from __future__ import annotations

from pathlib import Path

import pytest

from rapport.training.config import ConfigError, load_config


def test_shipped_configs_load_with_their_labels() -> None:
    churn, clv = load_config("churn"), load_config("clv")
    assert churn.label == "churned_90d"
    assert clv.label == "future_spend_365d"
    assert churn.gate.metric == "roc_auc" and churn.gate.higher_is_better
    assert clv.registered_name == "rapport-clv"


def test_overrides_apply_dotted_paths_and_skip_none() -> None:
    config = load_config(
        "churn",
        {"horizon_days": 60, "cutoffs.count": 4, "lightgbm.params.num_leaves": 7, "seed": None},
    )
    assert config.label == "churned_60d"
    assert config.cutoffs.count == 4
    assert config.lightgbm.params["num_leaves"] == 7
    assert config.seed == 42


def test_config_is_frozen() -> None:
    config = load_config("churn")
    with pytest.raises(ValueError):
        config.horizon_days = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("task: churn\nregistered_name: x\nhorizon_days: 90\n", "gate"),
        (
            "task: churn\nregistered_name: x\nhorizon_days: -1\ngate: {metric: roc_auc}\n",
            "horizon_days",
        ),
        (
            "task: churn\nregistered_name: x\nhorizon_days: 9\ngate: {metric: accuracy}\n",
            "gate.metric",
        ),
        (
            "task: churn\nregistered_name: x\nhorizon_days: 9\ngate: {metric: roc_auc}\nbogus: 1\n",
            "bogus",
        ),
        (
            "task: churn\nregistered_name: x\nhorizon_days: 9\ngate: {metric: roc_auc}\n"
            "cutoffs: {dates: [2024-01-31, 2024-02-29]}\n",
            "cutoffs.dates",
        ),
        (
            "task: churn\nregistered_name: x\nhorizon_days: 9\ngate: {metric: roc_auc}\n"
            "cutoffs: {count: 2}\n",
            "cutoffs.count",
        ),
        (
            "task: churn\nregistered_name: x\nhorizon_days: 9\ngate: {metric: roc_auc}\n"
            "split: {by: customers, valid_fraction: 0.5, test_fraction: 0.5}\n",
            "split",
        ),
        ("task: [unclosed\n", "not valid YAML"),
        (
            "task: churn\nregistered_name: x\nhorizon_days: 9\ngate: {metric: roc_auc}\n"
            "lightgbm: {params: {num_leafs: 7}}\n",
            "lightgbm.params: Value error, unknown LightGBM parameter 'num_leafs'",
        ),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, yaml_text: str, needle: str) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_lightgbm_parameters_and_their_aliases_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(
        "task: clv\nregistered_name: x\nhorizon_days: 9\ngate: {metric: gini}\n"
        "lightgbm: {params: {num_leaves: 7, min_child_samples: 20, reg_lambda: 1.0,\n"
        "  tweedie_variance_power: 1.3, objective: tweedie}}\n"
    )
    assert load_config(path).lightgbm.params["min_child_samples"] == 20
    # a typo is refused with the canonical name to use, not one of its aliases (num_leaf)
    path.write_text(path.read_text().replace("num_leaves", "num_leafs"))
    with pytest.raises(ConfigError, match=r"did you mean 'num_leaves'\?"):
        load_config(path)


def test_one_cutoff_is_enough_when_customers_are_held_out(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(
        "task: churn\nregistered_name: x\nhorizon_days: 9\ngate: {metric: roc_auc}\n"
        "cutoffs: {dates: [2024-01-31]}\nsplit: {by: customers}\n"
    )
    config = load_config(path)
    assert config.split.by == "customers" and config.cutoffs.number == 1


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Retraining Rapport's churn and lifetime-value models
#
# A walkthrough for a data scientist who retrains the models:
#
# 1. load and validate the event data;
# 2. look at the RFM segments and at a few feature distributions;
# 3. build the out-of-time training set and see how it is split;
# 4. train the churn and value models (tracked in MLflow) and compare them with the baselines;
# 5. look at the evaluation plots;
# 6. read the MLflow run back: parameters, metrics, artifacts, data lineage;
# 7. list the registered versions, understand the champion/challenger gate, promote by hand.
#
# Everything runs embedded: data and the MLflow store live under `RAPPORT_HOME`
# (default `.rapport`). Set `MLFLOW_TRACKING_URI` to use a tracking server instead.
#
# This file is the source of truth (a [jupytext](https://jupytext.readthedocs.io) percent
# script); the `.ipynb` is generated from it and not committed. See `notebooks/README.md`.
# The test suite runs it on a small world (`tests/test_notebook.py`).

# %% tags=["parameters"]
import os
from pathlib import Path

#: Customers in the synthetic world generated when no demo data exists yet.
N_CUSTOMERS = int(os.environ.get("RAPPORT_NB_CUSTOMERS", "20000"))
#: Seed of that world.
SEED = int(os.environ.get("RAPPORT_NB_SEED", "42"))
#: Few small trees and fewer cutoffs: for a quick look (and for the tests), not for real models.
FAST = os.environ.get("RAPPORT_NB_FAST", "0") == "1"
#: Where the demo data (`$RAPPORT_HOME/demo`) and the embedded MLflow store live.
RAPPORT_HOME = Path(os.environ.get("RAPPORT_HOME", ".rapport"))

# %%
import logging
import warnings

# MLflow's pickling and schema warnings are noise here.
warnings.filterwarnings("ignore", module=r"mlflow\..*")

import mlflow
import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from rapport.features.contracts import DataValidationError, load_interactions, load_transactions
from rapport.features.segments import SEGMENTS, segment_summary
from rapport.features.synthetic import SyntheticConfig, write_synthetic
from rapport.training import pipeline, plots, tracking
from rapport.training.config import QUICK_OVERRIDES, load_config
from rapport.training.datasets import build_training_set
from rapport.training.models import BTYDFeatures
from rapport.training.settings import TrainingSettings

try:  # Inside Jupyter: rich display. As a plain script: print.
    from IPython import get_ipython
    from IPython.display import Image, display
except ImportError:  # pragma: no cover - IPython comes with the dev extra
    get_ipython = None  # type: ignore[assignment]
    display = print  # type: ignore[assignment]

logging.getLogger("mlflow").setLevel(logging.ERROR)  # after import: mlflow sets it to INFO
pd.set_option("display.width", 140, "display.max_columns", 30, "display.precision", 4)

settings = TrainingSettings(home=RAPPORT_HOME)
FIGURES = RAPPORT_HOME / "notebook"
FIGURES.mkdir(parents=True, exist_ok=True)


def new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas: no pyplot, no GUI backend, never blocks."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def show(fig: Figure, name: str) -> None:
    """Save ``fig`` under ``$RAPPORT_HOME/notebook/`` and display it inline in Jupyter."""
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=90)
    if get_ipython is not None and get_ipython() is not None:
        display(Image(filename=str(path)))
    else:
        print(f"[figure] {path}")


print(f"RAPPORT_HOME={RAPPORT_HOME.resolve()}  fast={FAST}")

# %% [markdown]
# ## 1. Load and validate the data
#
# Rapport needs two tables (see the data contracts in the README): **transactions**
# (`customer_id`, `timestamp`, `amount`, optional `order_id`) and, optionally,
# **interactions** (`customer_id`, `timestamp`, `channel`, `event`).
# We use the demo world in `$RAPPORT_HOME/demo` (written by `rapport demo`) when it exists,
# and generate a seeded synthetic one otherwise. To retrain on your own data, point
# `TX_PATH` and `IX_PATH` at your files (CSV or Parquet; map column names with
# `load_transactions(path, columns={...})`).

# %%
DEMO_DIR = settings.demo_dir
TX_PATH = DEMO_DIR / "transactions.parquet"
IX_PATH = DEMO_DIR / "interactions.parquet"
if TX_PATH.exists() and IX_PATH.exists():
    print(f"Using the existing demo data in {DEMO_DIR}")
else:
    summary = write_synthetic(SyntheticConfig(n_customers=N_CUSTOMERS, seed=SEED), DEMO_DIR)
    print(
        f"Generated {summary.n_customers:,} customers, {summary.n_transactions:,} transactions "
        f"and {summary.n_interactions:,} interactions into {DEMO_DIR}"
    )

# %% [markdown]
# The loaders validate as they read: a missing column, an unparsable timestamp, a
# non-numeric amount, a null id or an empty table raise `DataValidationError` naming the
# column and the first offending rows; exact duplicate rows are dropped and counted.

# %%
tx = load_transactions(TX_PATH)
ix = load_interactions(IX_PATH)
LAST_DAY = tx["timestamp"].max().date()
overview = pd.DataFrame(
    {
        "rows": [len(tx), len(ix)],
        "customers": [tx["customer_id"].nunique(), ix["customer_id"].nunique()],
        "first": [tx["timestamp"].min(), ix["timestamp"].min()],
        "last": [tx["timestamp"].max(), ix["timestamp"].max()],
        "duplicates dropped": [tx.attrs["duplicates_dropped"], ix.attrs["duplicates_dropped"]],
    },
    index=["transactions", "interactions"],
)
display(overview)
print(f"refund rows: {(tx['amount'] < 0).mean():.1%}; amount quantiles:")
display(tx["amount"].describe(percentiles=[0.05, 0.5, 0.95]).to_frame().T)
display(pd.crosstab(ix["channel"], ix["event"]))

# %% [markdown]
# What a contract violation looks like (a made-up table with an unparsable timestamp):

# %%
bad = pd.DataFrame(
    {
        "customer_id": ["a", "b", "c"],
        "timestamp": ["2025-01-02", "yesterday", "2025-01-03"],
        "amount": [10.0, 5.0, 7.5],
    }
)
try:
    load_transactions(bad)
except DataValidationError as err:
    print(err)

# %% [markdown]
# ## 2. RFM segments
#
# Features are point-in-time: at a cutoff, only events up to that day are read. We look at
# one cutoff whose 90-day churn label is fully observed (the latest month-end at least 90
# days before the end of the data), with features and labels side by side.

# %%
HORIZON = 90
EXPLORE_CUTOFF = (
    (pd.Timestamp(LAST_DAY) - pd.Timedelta(days=HORIZON)).to_period("M").to_timestamp()
    - pd.Timedelta(days=1)
).date()
explore = build_training_set(tx, ix, cutoffs=[EXPLORE_CUTOFF], horizon_days=HORIZON, validate=False)
churn_label = f"churned_{HORIZON}d"
print(
    f"cutoff {EXPLORE_CUTOFF}: {len(explore):,} customers, "
    f"{explore[churn_label].mean():.1%} make no purchase in the next {HORIZON} days"
)

# %%
segments = segment_summary(explore)
churn_by_segment = explore.groupby("segment", observed=True)[churn_label].mean()
segments["churn_rate"] = segments["segment"].map(churn_by_segment).astype(float)
display(segments.drop(columns="as_of").set_index("segment"))

# %%
fig = new_figure(11, 4.2)
ax_n, ax_churn = fig.subplots(1, 2)
names = [s for s in SEGMENTS if s in set(segments["segment"])]
by_name = segments.set_index("segment").loc[names]
ax_n.barh(names[::-1], by_name["customers"].to_numpy()[::-1])
ax_n.set(xlabel="Customers", title=f"RFM segments at {EXPLORE_CUTOFF}")
ax_churn.barh(names[::-1], by_name["churn_rate"].to_numpy()[::-1], color="tab:red")
ax_churn.axvline(explore[churn_label].mean(), linestyle="--", color="grey", label="overall")
ax_churn.set(xlabel=f"{HORIZON}-day churn rate", xlim=(0, 1), title="Churn by segment")
ax_churn.legend(loc="lower right")
show(fig, "segments")

# %% [markdown]
# ## 3. Feature distributions by churn label
#
# A few of the model's inputs, for customers who went on to churn and for those who bought
# again. Recency separates them most; interaction features (e-mail open rate) add signal
# that pure RFM misses, because engagement fades before a customer lapses.

# %%
DIST_FEATURES = {
    "recency_days": False,
    "frequency": True,
    "spend_365d": True,
    "email_open_rate_365d": False,
}
fig = new_figure(11, 7)
axes = fig.subplots(2, 2).ravel()
churned = explore[churn_label].astype(bool)
for ax, (column, log) in zip(axes, DIST_FEATURES.items(), strict=True):
    values = explore[column].astype("float64")
    values = np.log1p(values.clip(lower=0)) if log else values
    finite = values[np.isfinite(values)]
    bins = np.linspace(finite.min(), finite.max(), 31) if len(finite) else 30
    for flag, label, colour in ((False, "bought again", "tab:blue"), (True, "churned", "tab:red")):
        part = values[(churned == flag) & np.isfinite(values)]
        ax.hist(part, bins=bins, density=True, alpha=0.5, label=label, color=colour)
    ax.set(xlabel=f"log1p({column})" if log else column, ylabel="density")
    ax.legend()
fig.suptitle(f"Feature distributions at {EXPLORE_CUTOFF}")
show(fig, "distributions")

# %%
display(
    explore.groupby(churned.map({True: "churned", False: "bought again"}))[list(DIST_FEATURES)]
    .median()
    .rename_axis("median by label")
)

# %% [markdown]
# ## 4. Configs and the out-of-time training set
#
# Each model has a YAML config (`training/configs/churn.yaml`, `clv.yaml`); `load_config`
# takes dotted overrides. The training set stacks feature rows at several month-end cutoffs.
# **Out-of-time** split: the last cutoff is the test set, the latest earlier one whose label
# horizon ends by the test cutoff validates (early stopping, churn calibration), and the ones
# before train. No label of a training row looks past the validation cutoff's features.

# %%
FAST_OVERRIDES = QUICK_OVERRIDES  # few small trees and cutoffs: a smoke run
overrides = dict(FAST_OVERRIDES) if FAST else {}
churn_config = load_config("churn", overrides)
# A small or short world cannot hold 8 quarterly cutoffs plus a 365-day horizon.
clv_overrides = {**overrides, "horizon_days": 180, "cutoffs.every_months": 2} if FAST else {}
clv_config = load_config("clv", clv_overrides)
print(yaml.safe_dump(churn_config.model_dump(mode="json"), sort_keys=False))

# %%
frame, split = pipeline.prepare_training_set(churn_config, tx, ix, settings=settings)
train_rows, valid_rows, test_rows = pipeline.split_frame(frame, split)
as_of = pd.to_datetime(frame["as_of"]).dt.date
split_table = (
    frame.assign(as_of=as_of, role=as_of.map(split.role))
    .groupby(["as_of", "role"])
    .agg(customers=("customer_id", "size"), churn_rate=(churn_config.label, "mean"))
    .reset_index()
)
display(split_table)

# %%
fig = new_figure(9, 3.8)
ax = fig.add_subplot()
colours = {"train": "tab:blue", "valid": "tab:orange", "test": "tab:green"}
ordered = split_table.sort_values("as_of").reset_index(drop=True)
x = np.arange(len(ordered))
for role, part in ordered.groupby("role"):
    ax.bar(x[part.index], part["customers"], color=colours[str(role)], label=str(role))
ax.set_xticks(x, ordered["as_of"].astype(str), rotation=30)
ax.set(ylabel="Customers (rows)", title="Out-of-time split: rows per cutoff")
twin = ax.twinx()
twin.plot(x, ordered["churn_rate"], "k.-", label="churn rate")
twin.set(ylabel=f"{churn_config.horizon_days}-day churn rate", ylim=(0, 1))
ax.legend(loc="upper left")
show(fig, "split")

# %% [markdown]
# ## 5. Train, tracked in MLflow
#
# `pipeline.train` rebuilds that training set, fits LightGBM with its baselines, logs
# parameters, metrics, plots, the data sets (lineage) and the model to MLflow, registers a
# new version, gives it the `challenger` alias and moves `champion` only if the gate passes
# (last step, so a failed run never touches the champion).
#
# Candidates, all fitted on the training rows; the one with the best validation value of the
# gate's metric is registered, whatever its family:
#
# - churn: `lightgbm`, `logistic` (logistic regression on log RFM), `bgnbd` (BG/NBD
#   probability of no purchase in the horizon), `pnbd` (Pareto/NBD 1 - P(alive)); beside
#   them `bgnbd_rank` and `pnbd_rank` (ranking by expected purchases: rank metrics only);
# - value: `lightgbm`, `bgnbd_gg` (BG/NBD expected purchases x Gamma-Gamma spend) and
#   `two_part` (P(purchase) x buyers' spend, linear in log RFM).
#
# The gate promotes only a version that beats the champion and the best other baseline on
# the test rows; `notes` give the gain over that baseline with a paired bootstrap interval.

# %%
tracking_uri = tracking.configure(settings)
print(f"MLflow store: {tracking_uri}")
churn_result = pipeline.train(
    churn_config, TX_PATH, IX_PATH, source=str(TX_PATH), settings=settings
)
print(f"{churn_result.registered_name} v{churn_result.version}: promoted={churn_result.promoted}")
print(f"gate: {churn_result.gate_reason}")
print("\n".join(churn_result.notes))
display(churn_result.metrics)

# %%
clv_result = pipeline.train(clv_config, TX_PATH, IX_PATH, source=str(TX_PATH), settings=settings)
print(f"{clv_result.registered_name} v{clv_result.version}: promoted={clv_result.promoted}")
print(f"gate: {clv_result.gate_reason}")
display(clv_result.metrics)

# %% [markdown]
# How to read them: for churn, `roc_auc`/`pr_auc` rank customers (higher is better),
# `brier`, `log_loss` and `ece` measure calibration (lower is better): the model should beat
# `logistic` and `bgnbd` on both. For value, `gini` and `spearman` rank customers by
# predicted value, `decile_mape` compares the mean per predicted decile, `mae`/`rmse` are
# per customer. On a small world with fast settings the margins are noisy.

# %% [markdown]
# ## 6. Evaluation plots
#
# The run logged these plots (made by `rapport.training.plots`) as artifacts; we read them
# back from the artifact store.

# %%
client = MlflowClient()


def show_artifact(run_id: str, path: str, name: str) -> None:
    """Download a PNG artifact of a run and display it."""
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))
    target = FIGURES / f"{name}.png"
    target.write_bytes(local.read_bytes())
    if get_ipython is not None and get_ipython() is not None:
        display(Image(filename=str(target)))
    else:
        print(f"[figure] {target}")


for artifact in ("calibration.png", "gain.png", "feature_importance.png"):
    show_artifact(churn_result.run_id, f"plots/{artifact}", f"churn_{artifact[:-4]}")
for artifact in ("deciles.png", "feature_importance.png"):
    show_artifact(clv_result.run_id, f"plots/{artifact}", f"clv_{artifact[:-4]}")

# %% [markdown]
# The same functions work on any scores. Here we load the registered churn version from the
# registry (exactly what serving loads), score the test rows ourselves, check that we get
# the logged test AUC back, and draw calibration and gain for the registered model against
# BG/NBD, plus the calibration within each RFM segment.

# %%
registered = mlflow.pyfunc.load_model(
    f"models:/{churn_result.registered_name}/{churn_result.version}"
)
# The model's signature types categories as strings, as a client sends them in JSON.
request = test_rows.copy()
for column in request.select_dtypes(include="category").columns:
    request[column] = request[column].astype("string").astype(object)
scores = registered.predict(request)
y_test = test_rows[churn_config.label].astype("int8").to_numpy()
p_model = scores["churn_probability"].to_numpy()
btyd = BTYDFeatures(churn_config.horizon_days, seed=churn_config.seed).fit(test_rows)
p_bgnbd = btyd.transform(test_rows)[f"p_no_purchase_{churn_config.horizon_days}d"].to_numpy()
logged_auc = client.get_run(churn_result.run_id).data.metrics["test_roc_auc"]
print(f"test AUC logged {logged_auc:.4f}, recomputed {roc_auc_score(y_test, p_model):.4f}")
probs = {"registered": p_model, "bgnbd": np.clip(p_bgnbd, 0, 1)}
show(plots.calibration_plot(y_test, probs), "churn_calibration_registered")
show(plots.gain_plot(y_test, probs), "churn_gain_registered")

# %%
by_segment = (
    pd.DataFrame(
        {"segment": test_rows["segment"].to_numpy(), "predicted": p_model, "observed": y_test}
    )
    .groupby("segment", observed=True)
    .agg(
        customers=("observed", "size"),
        predicted=("predicted", "mean"),
        observed=("observed", "mean"),
    )
)
display(by_segment.reindex([s for s in SEGMENTS if s in by_segment.index]))

# %% [markdown]
# ## 7. Read the MLflow run back
#
# Everything about a run is in the tracking store: browse it with
# `mlflow ui --backend-store-uri <store>` or, as here, with `MlflowClient`.

# %%
run = client.get_run(churn_result.run_id)
print(f"run {run.info.run_id} ({run.info.run_name}), status {run.info.status}")
print("tags:", {k: v for k, v in run.data.tags.items() if k.startswith("rapport.")})
params = pd.Series(run.data.params).sort_index()
display(params[params.index.str.match(r"(horizon|test_|valid_|train_|data_|lightgbm\.num|gate)")])

# %%
metric_rows = []
for key, value in run.data.metrics.items():
    # every candidate's test metrics: {candidate|baseline}_{name}_test_{metric}
    role, _, rest = key.partition("_")
    model_name, found, metric = rest.partition("_test_")
    if role not in ("candidate", "baseline") or not found:
        continue
    metric_rows.append({"model": model_name, "metric": metric, "value": value})
display(pd.DataFrame(metric_rows).pivot(index="model", columns="metric", values="value"))


# %%
def walk_artifacts(run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run."""
    found: list[str] = []
    for item in client.list_artifacts(run_id, path):
        found += walk_artifacts(run_id, item.path) if item.is_dir else [item.path]
    return found


artifacts = walk_artifacts(run.info.run_id)
print("\n".join(artifacts))
gate_file = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="gate.txt")
print("gate.txt:", Path(gate_file).read_text())

# %% [markdown]
# **Lineage**: the train, validation and test rows are logged as MLflow datasets (name,
# digest of the content, source path, row count), so a version can be traced to its data.

# %%
lineage = pd.DataFrame(
    [
        {
            "context": {t.key: t.value for t in inp.tags}.get("mlflow.data.context"),
            "rows": {t.key: t.value for t in inp.tags}.get("rows"),
            "name": inp.dataset.name,
            "digest": inp.dataset.digest,
            "source": inp.dataset.source,
        }
        for inp in run.inputs.dataset_inputs
    ]
)
display(lineage)

# %% [markdown]
# ## 8. Versions, the champion/challenger gate, and promoting by hand
#
# Each run registers a new version and points the `challenger` alias at it. The gate then
# decides whether it also takes `champion` (what serving loads, `models:/rapport-churn@champion`):
#
# - the new model must reach `gate.min_value` on `gate.metric` (churn: `roc_auc` >= 0.6;
#   value: `gini` >= 0.3) on the test cutoff, and
# - beat the current champion, **scored on the same new test rows**, by at least
#   `gate.min_improvement`.
#
# The reason is logged (`gate.txt`, the `rapport.gate` run tag, the version's `gate` tag).
# To see the gate at work we train a second churn version without the BG/NBD features (a
# typical ablation) and let the gate compare it with the champion.

# %%
print("churn gate:", churn_config.gate)
print("value gate:", clv_config.gate)
ablation = load_config("churn", {**overrides, "btyd_features": False})
ablation_result = pipeline.train(ablation, TX_PATH, IX_PATH, source=str(TX_PATH), settings=settings)
print(f"v{ablation_result.version} promoted={ablation_result.promoted}")
print(f"gate: {ablation_result.gate_reason}")
versions = tracking.list_versions([churn_config.registered_name, clv_config.registered_name])
display(versions[["model", "version", "aliases", "test_cutoff", "roc_auc", "gini"]])

# %% [markdown]
# Sometimes a person overrides the gate: to roll back after a bad release, or to ship a
# model that is better on something the gate does not measure. `tracking.promote` (the same
# as `rapport promote`) moves `champion` and records who/why and when on the version.
# Here we promote whichever churn version is *not* the champion, then roll back.


# %%
def aliases(name: str) -> dict[str, str]:
    """Alias -> version of a registered model."""
    return dict(client.get_registered_model(name).aliases)


name = churn_config.registered_name
before = aliases(name)
gate_champion = before.get(tracking.CHAMPION)  # None if no version ever passed the gate
other = next(v for v in (churn_result.version, ablation_result.version) if v != gate_champion)
tracking.promote(name, other, reason="notebook: manual promotion demo")
after = aliases(name)
display(pd.DataFrame({"before": before, "after promote": after}))
print("version tags:", client.get_model_version(name, other).tags)

# %%
if gate_champion is not None:
    tracking.promote(name, gate_champion, reason="notebook: roll back to the gate's choice")
display(pd.DataFrame({"after rollback": aliases(name)}))
display(tracking.list_versions([name])[["model", "version", "aliases", "roc_auc"]])

# %% [markdown]
# ## Next steps
#
# - retrain on the full world without `RAPPORT_NB_FAST` (or from the shell:
#   `rapport train churn`), and check the gate's verdict;
# - score a cutoff with a registered version: `evaluate.evaluate_registered(config,
#   "models:/rapport-churn@champion", TX_PATH, IX_PATH, as_of=...)`;
# - browse every run: `mlflow ui --backend-store-uri <the store printed above>`.

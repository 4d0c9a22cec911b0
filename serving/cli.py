"""The ``rapport`` command: one Typer app with a sub-command per stage.

It lives in the top layer because the main job (``rapport demo``) strings every stage
together; the stage sub-apps themselves live beside their code.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from rapport.features.cli import (
    data_app,
    features_app,
    print_feature_summary,
)
from rapport.features.cli_inputs import (
    InteractionsOpt,
    ReadOptions,
    TransactionsOpt,
    check_cutoffs_reach_purchases,
    open_inputs,
    reads_inputs,
)
from rapport.features.console import console, progress_bar, run_or_exit, step
from rapport.serving.keys_cli import keys_app
from rapport.serving.scoring import Scorer
from rapport.serving.settings import ServingSettings
from rapport.training.cli import print_metrics, quiet_mlflow
from rapport.training.cli import register as register_training_commands
from rapport.training.settings import TrainingSettings

app = typer.Typer(
    name="rapport",
    help="Rapport: customer scoring for relationship marketing.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
register_training_commands(app)
app.add_typer(keys_app, name="keys")


ChurnModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Registered churn model to use (default rapport-churn; RAPPORT_CHURN_MODEL)."
    ),
]
ClvModelOpt = Annotated[
    str | None,
    typer.Option(help="Registered value model to use (default rapport-clv; RAPPORT_CLV_MODEL)."),
]
AliasOpt = Annotated[
    str | None,
    typer.Option(help="Registry alias of both models (default champion; RAPPORT_MODEL_ALIAS)."),
]


def _settings(**overrides: object) -> ServingSettings:
    """Settings from the environment, with the options a command was given on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return ServingSettings(**given)  # type: ignore[arg-type]


@app.command("demo")
def demo(
    customers: Annotated[int, typer.Option(help="Customers in the synthetic demo world.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed of the demo data.")] = 42,
    horizon_days: Annotated[int, typer.Option(help="Label horizon in days.")] = 90,
    train_models: Annotated[
        bool,
        typer.Option(
            "--train/--no-train", help="Train, evaluate and register the churn and value models."
        ),
    ] = True,
    serve_models: Annotated[
        bool,
        typer.Option(
            "--serve/--no-serve",
            help="Score everyone, then serve the champions on 127.0.0.1 until Ctrl-C.",
        ),
    ] = True,
) -> None:
    """Run the main job end to end on embedded demo data.

    Generate data, build features and labels, summarise segments, train the churn and value
    models, compare them with the baselines in MLflow and register them, write the serving
    snapshot, score every customer, and serve the champions over HTTP.
    """
    from rapport.serving.demo import make_demo_world, score_demo_customers, train_demo_models

    world = make_demo_world(customers, seed, horizon_days, step=step)
    print_feature_summary(world.features, title="Demo customers by segment")
    churn = world.labels.groupby("as_of")[f"churned_{horizon_days}d"].mean()
    console.print(
        f"{horizon_days}-day churn rate across cutoffs: {churn.min():.1%} - {churn.max():.1%}; "
        f"outputs in {world.folder}"
    )
    if not train_models:
        return
    train_settings = TrainingSettings()
    quiet_mlflow()
    console.print(f"MLflow store: {train_settings.tracking_uri}")
    for result in train_demo_models(world, settings=train_settings, step=step):
        print_metrics(result.metrics, f"{result.registered_name}: {result.split.describe()}")
        verdict = "champion" if result.promoted else "challenger only"
        console.print(
            f"{result.registered_name} v{result.version}: {verdict} ({result.gate_reason})"
        )
    console.print(
        "`rapport models` lists versions; `mlflow ui --backend-store-uri "
        f"{train_settings.tracking_uri}` browses the runs."
    )
    serving = ServingSettings()
    snapshot, scored = score_demo_customers(world, _load_scorer(serving), serving, step=step)
    console.print(
        f"Snapshot of {snapshot.customers:,} customers as of {snapshot.as_of} -> "
        f"{snapshot.path}; {scored.rows:,} customers scored -> {scored.out}",
        soft_wrap=True,
    )
    if serve_models:
        raise typer.Exit(code=run_service(serving, bento=None))
    console.print("Serve them with `rapport serve`, then try:")
    console.print(curl_example(serving.host, serving.port), soft_wrap=True, markup=False)


serve_app = typer.Typer(
    help="Serve the champion models over HTTP (BentoML), or build a Bento that pins them.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(serve_app, name="serve")


def _load_scorer(settings: ServingSettings) -> Scorer:
    from rapport.serving.core import load_models

    quiet_mlflow()
    try:
        churn, value = load_models(settings)
    except LookupError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(code=2) from err
    return Scorer(churn, value)


def write_serving_snapshot(
    transactions: Path | pd.DataFrame,
    interactions: Path | pd.DataFrame | None,
    as_of: dt.date,
    scorer: Scorer,
    settings: ServingSettings,
    out: Path | None = None,
) -> None:
    """Write the snapshot the service scores by id, with the served models' features.

    One path for ``rapport snapshot`` and ``rapport demo``; the file goes to ``out`` or
    where the service reads it (``RAPPORT_SNAPSHOT``, default ``$RAPPORT_HOME/snapshot.parquet``).
    """
    from rapport.serving.core import write_snapshot

    target = out or settings.snapshot_path
    with step(f"Writing the serving snapshot (features as of {as_of})"):
        written = run_or_exit(
            lambda: write_snapshot(
                transactions,
                interactions,
                as_of=as_of,
                scorer=scorer,
                out=target,
                duckdb_threads=settings.duckdb_threads,
                duckdb_memory_limit=settings.duckdb_memory_limit,
            )
        )
    # soft wrap: a path broken over two lines does not paste back
    console.print(
        f"Snapshot of {written.customers:,} customers as of {written.as_of} -> {written.path}",
        soft_wrap=True,
    )
    if target.resolve() != settings.snapshot_path.resolve():
        console.print(
            f"The service reads {settings.snapshot_path}; serve this file with "
            f"RAPPORT_SNAPSHOT={target}",
            soft_wrap=True,
        )


def curl_example(host: str, port: int, *, with_key: bool = False) -> str:
    """A ready-to-paste request against a running service (with its key from $RAPPORT_KEY)."""
    auth = '-H "Authorization: Bearer $RAPPORT_KEY" ' if with_key else ""
    return (
        f"curl -s -X POST http://{host}:{port}/v1/score/by-id {auth}"
        "-H 'Content-Type: application/json' "
        """-d '{"customer_ids": ["1", "2"], "explain": 3}'"""
    )


def run_service(settings: ServingSettings, *, bento: str | None) -> int:
    """Run ``bentoml serve`` in the foreground until it exits or is stopped; its exit code.

    SIGINT (Ctrl-C) and SIGTERM stop the server and all its workers
    (:func:`rapport.serving.process.run_server`), so nothing answers on the port afterwards.
    """
    from rapport.serving.auth import serve_check
    from rapport.serving.process import run_server

    error, warning = serve_check(settings)
    if error:
        console.print(f"[red]error:[/] {error}", soft_wrap=True)
        return 2
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    target = bento or "rapport.serving.service:Rapport"
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        target,
        "--host",
        settings.host,
        "--port",
        str(settings.port),
    ]
    console.print(f"Serving {target} on http://{settings.host}:{settings.port} (Ctrl-C stops)")
    console.print(f"OpenAPI page: http://{settings.host}:{settings.port}/  Try:")
    example = curl_example(settings.host, settings.port, with_key=settings.keys_required)
    console.print(example, soft_wrap=True, markup=False)
    # the service reads its settings from the environment: the models chosen here go with it,
    # and paths are absolute because a Bento is served from its own folder
    env = {
        **os.environ,
        "RAPPORT_HOME": str(settings.home.resolve()),
        "RAPPORT_SNAPSHOT": str(settings.snapshot_path.resolve()),
        "RAPPORT_CHURN_MODEL": settings.churn_model,
        "RAPPORT_CLV_MODEL": settings.clv_model,
        "RAPPORT_MODEL_ALIAS": settings.model_alias,
        # decided here, where the bind address is known: the worker never sees it
        "RAPPORT_REQUIRE_API_KEY": str(settings.keys_required).lower(),
        "RAPPORT_API_KEYS_FILE": str(settings.keys_path.resolve()),
    }
    return run_server(cmd, env, grace_seconds=settings.stop_grace_seconds)


def _bento_exists(tag: str) -> bool:
    import bentoml

    try:
        bentoml.bentos.get(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True


@serve_app.callback()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default 127.0.0.1; RAPPORT_HOST).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (default 3000; RAPPORT_PORT).")
    ] = None,
    bento: Annotated[
        str,
        typer.Option(help="Bento to serve when it exists (built by `rapport serve build`)."),
    ] = "rapport:latest",
    registry: Annotated[
        bool,
        typer.Option(
            "--registry/--prefer-bento",
            help="Serve the registry's current champions instead of the built Bento.",
        ),
    ] = False,
    churn_model: ChurnModelOpt = None,
    clv_model: ClvModelOpt = None,
    alias: AliasOpt = None,
    require_api_key: Annotated[
        bool | None,
        typer.Option(
            "--require-api-key/--no-require-api-key",
            help="Require 'Authorization: Bearer <key>' (`rapport keys create`); default: "
            "required unless --host is loopback (RAPPORT_REQUIRE_API_KEY).",
        ),
    ] = None,
) -> None:
    """Serve the champion models on 127.0.0.1 (the built Bento if any, else the registry)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(
        host=host,
        port=port,
        churn_model=churn_model,
        clv_model=clv_model,
        model_alias=alias,
        require_api_key=require_api_key,
    )
    # models named on the command line come from the registry, not a Bento pinning others
    chosen = churn_model or clv_model or alias
    use = None if registry or chosen or not _bento_exists(bento) else bento
    raise typer.Exit(code=run_service(settings, bento=use))


@serve_app.command("build")
def serve_build(
    build_dir: Annotated[
        Path | None,
        typer.Option(help="Where to write service.py and bentofile.yaml ($RAPPORT_HOME/bento)."),
    ] = None,
) -> None:
    """Copy the champion models into the BentoML store and build a Bento pinning them."""
    from rapport.serving.bento import build_bento

    settings = ServingSettings()
    quiet_mlflow()
    with step("Importing the champion models and building the Bento"):
        try:
            built = build_bento(settings, build_dir=build_dir)
        except LookupError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(code=2) from err
    console.print(
        f"Built Bento {built.tag}: {built.churn.label} as {built.churn_model_tag}, "
        f"{built.clv.label} as {built.clv_model_tag}. Run it with `rapport serve`."
    )


@app.command("score")
@reads_inputs()
def score(
    as_of: Annotated[
        str | None,
        typer.Option(help="Cutoff date YYYY-MM-DD (default: the last day of the data)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output Parquet (default $RAPPORT_HOME/scores.parquet)."),
    ] = None,
    transactions: Annotated[
        Path | None,
        typer.Option("--transactions", "-t", help="Transactions (default: the demo data)."),
    ] = None,
    interactions: Annotated[
        Path | None,
        typer.Option("--interactions", "-i", help="Interactions (default: the demo data)."),
    ] = None,
    chunk_rows: Annotated[
        int, typer.Option(min=1_000, help="Customers scored per chunk (bounds memory).")
    ] = 200_000,
    db_url: Annotated[
        str | None,
        typer.Option(help="Also write a table here (SQLAlchemy URL, e.g. postgresql+psycopg://)."),
    ] = None,
    table: Annotated[str, typer.Option(help="Table name for --db-url.")] = "rapport_scores",
    churn_model: ChurnModelOpt = None,
    clv_model: ClvModelOpt = None,
    alias: AliasOpt = None,
    *,
    read: ReadOptions,
) -> None:
    """Score every customer with the champion models as of a date, in chunks, to Parquet."""
    from rapport.serving.batch import score_batch, score_chunks

    settings = _settings(churn_model=churn_model, clv_model=clv_model, model_alias=alias)
    if transactions is None:
        transactions = settings.demo_dir / "transactions.parquet"
        demo_ix = settings.demo_dir / "interactions.parquet"
        interactions = interactions or (demo_ix if demo_ix.exists() else None)
        if not transactions.exists():
            console.print("[red]error:[/] no --transactions and no demo data: run `rapport demo`")
            raise typer.Exit(code=2)
    scorer = _load_scorer(settings)
    given_day = _parse_day(as_of) if as_of else None
    # Parquet that Rapport wrote in the contract (the demo, `rapport data synth`) is scanned
    # by DuckDB as it is; anything else is loaded and validated first, as training does
    inputs = open_inputs(transactions, interactions, **read)
    cutoff = given_day or inputs.last_day or dt.date.today()
    run_or_exit(lambda: check_cutoffs_reach_purchases(inputs.first_purchase, [cutoff]))
    out = out or settings.home / "scores.parquet"
    chunks = score_chunks(
        inputs.transactions,
        inputs.interactions,
        as_of=cutoff,
        scorer=scorer,
        chunk_rows=chunk_rows,
        validate=False,
        duckdb_threads=settings.duckdb_threads,
        duckdb_memory_limit=settings.duckdb_memory_limit,
        currency=read.get("currency"),
    )
    with progress_bar(f"Scoring customers as of {cutoff}") as advance:
        result = run_or_exit(
            lambda: score_batch(chunks, out, database_url=db_url, table=table, progress=advance)
        )
    where = f" and table {result.table}" if result.table else ""
    console.print(
        f"Scored {result.rows:,} customers as of {cutoff} in {result.seconds:.1f} s "
        f"({scorer.churn_version.label}, {scorer.value_version.label}) -> {result.out}{where}"
    )


@app.command("snapshot")
@reads_inputs()
def snapshot(
    transactions: TransactionsOpt,
    as_of: Annotated[
        str,
        typer.Option(
            "--as-of", help="Date YYYY-MM-DD of the features (a date includes its whole day)."
        ),
    ],
    interactions: InteractionsOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Parquet file to write (default: where the service reads it, "
            "RAPPORT_SNAPSHOT or $RAPPORT_HOME/snapshot.parquet).",
        ),
    ] = None,
    churn_model: ChurnModelOpt = None,
    clv_model: ClvModelOpt = None,
    alias: AliasOpt = None,
    *,
    read: ReadOptions,
) -> None:
    """Write the feature snapshot that `rapport serve` scores customers by id from.

    Each customer's features as of a date, built from your data with the windows and
    interaction pairs the served models were trained with.
    """
    settings = _settings(churn_model=churn_model, clv_model=clv_model, model_alias=alias)
    day = _parse_day(as_of)
    scorer = _load_scorer(settings)
    inputs = open_inputs(transactions, interactions, **read)
    run_or_exit(lambda: check_cutoffs_reach_purchases(inputs.first_purchase, [day]))
    write_serving_snapshot(inputs.transactions, inputs.interactions, day, scorer, settings, out)


def _parse_day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as err:
        raise typer.BadParameter(f"--as-of must be YYYY-MM-DD, not {text!r}") from err


def main() -> None:
    """Entry point of the ``rapport`` console script."""
    app()

"""``rapport keys``: create, list and revoke the API keys the service accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rapport.features.console import console
from rapport.serving.auth import create_key, read_keys, revoke_key
from rapport.serving.settings import ServingSettings

keys_app = typer.Typer(
    help="API keys for `rapport serve` (stored hashed in $RAPPORT_HOME/api_keys.json).",
    no_args_is_help=True,
)

KeysFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--keys-file",
        help="Keys file (default $RAPPORT_HOME/api_keys.json; RAPPORT_API_KEYS_FILE).",
    ),
]


def _keys_path(keys_file: Path | None) -> Path:
    return keys_file if keys_file is not None else ServingSettings().keys_path


@keys_app.command("create")
def create(
    name: Annotated[
        str | None, typer.Option(help="Name of the key (default key-1, key-2, ...).")
    ] = None,
    keys_file: KeysFileOpt = None,
) -> None:
    """Make a new key and print it once: only its hash is stored."""
    path = _keys_path(keys_file)
    try:
        record, key = create_key(path, name)
    except ValueError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(code=2) from err
    # stdout carries the key alone, so that `KEY=$(rapport keys create)` works
    typer.echo(key)
    console.print(
        f"Key {record.name!r} added to {path}. It is not shown again: keep it now. "
        "Clients send it as 'Authorization: Bearer <key>'.",
        soft_wrap=True,
    )


@keys_app.command("list")
def list_keys(keys_file: KeysFileOpt = None) -> None:
    """Show the keys' names and creation times (never the keys)."""
    path = _keys_path(keys_file)
    keys = read_keys(path)
    if not keys:
        console.print(f"No API keys in {path}; make one with `rapport keys create`.")
        return
    for record in keys:
        typer.echo(f"{record.name}\t{record.created}")


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="Name of the key to revoke.")],
    keys_file: KeysFileOpt = None,
) -> None:
    """Remove a key; a running service refuses it from its next request on."""
    path = _keys_path(keys_file)
    try:
        revoke_key(path, name)
    except KeyError as err:
        console.print(f"[red]error:[/] no key named {name!r} in {path}")
        raise typer.Exit(code=2) from err
    console.print(f"Key {name!r} revoked.")

"""`orderpipe console hash-password`: the hash of a console user's password, for
ORDERPIPE_CONSOLE_USERS (`name:role:hash`). The console itself runs as `orderpipe run ops-console`
(`orderpipe up` starts it).

Register with `app.add_typer(console_cmd.app, name="console")`.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="The ops web console: hash a user's password.", no_args_is_help=True)


@app.command("hash-password")
def hash_password_(
    name: Annotated[str, typer.Option("--name", help="The user's name, to print the whole entry.")] = "",
    role: Annotated[str, typer.Option("--role", help="viewer (reads every page) or operator (may also "
                                                     "replay, purge and cancel).")] = "viewer",
) -> None:
    """Ask for a password (twice, not echoed) and print its hash, or with --name the whole
    ORDERPIPE_CONSOLE_USERS entry (entries are separated by commas)."""
    from services.console.auth import ROLES, hash_password

    if role not in ROLES:
        typer.echo(f"error: --role must be one of {', '.join(ROLES)}", err=True)
        raise typer.Exit(1)
    if ":" in name or "," in name:
        typer.echo("error: --name cannot hold ':' or ','", err=True)
        raise typer.Exit(1)
    password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        typer.echo("error: use at least 8 characters", err=True)
        raise typer.Exit(1)
    hashed = hash_password(password)
    typer.echo(f"{name}:{role}:{hashed}" if name else hashed)

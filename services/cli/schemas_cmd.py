"""`orderpipe schemas`: check and list the event contracts in `schemas/`.

`check` is what CI runs: a breaking change prints one line per problem naming the subject,
the versions and the field, and exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.runtime.codec import SCHEMAS_DIR

app = typer.Typer(help="Check and list the Avro event schemas (schemas/ and registry.json).", no_args_is_help=True)

SchemasDir = Annotated[Path, typer.Option("--schemas-dir", help="Folder with the .avsc files and registry.json.",
                                          file_okay=False)]


@app.command("check")
def check(
    schemas_dir: SchemasDir = SCHEMAS_DIR,
    against: Annotated[str | None, typer.Option(
        "--against", metavar="GIT_REF",
        help="Also check that no id of the manifest at this git ref (e.g. origin/main) was removed, "
             "renumbered or edited.")] = None,
) -> None:
    """Manifest rules and BACKWARD_TRANSITIVE compatibility of every subject; exit 1 on any problem."""
    from services.tools.compatibility import check_all, subjects

    problems = check_all(schemas_dir, against)
    # Plain lines, never wrapped: CI logs and grep read them.
    for p in problems:
        typer.echo(f"FAIL {p}")
    if problems:
        typer.echo(f"{len(problems)} schema problem(s)", err=True)
        raise typer.Exit(1)
    for subject, entries in subjects(schemas_dir).items():
        versions = ", ".join(f"v{e.version}" for e in entries)
        typer.echo(f"OK   {subject} ({versions}: backward transitive)")


@app.command("list")
def list_schemas(schemas_dir: SchemasDir = SCHEMAS_DIR) -> None:
    """Subjects with their versions, ids and files."""
    from services.tools.compatibility import subjects

    try:
        by_subject = subjects(schemas_dir)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    rows = [(subject, str(e.version), str(e.id), e.file) for subject, entries in by_subject.items() for e in entries]
    rows.insert(0, ("SUBJECT", "VERSION", "ID", "FILE"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for subject, version, schema_id, file in rows:
        typer.echo(f"{subject:<{widths[0]}}  {version:>{widths[1]}}  {schema_id:>{widths[2]}}  {file}")

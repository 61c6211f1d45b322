"""What a dead-letter replay or purge means for keys held by ordered retries
(services/runtime/held.py): a dead letter can be the head its key waits for. A purge gives the
head up, so its key is released (its waiting events run); a replay puts the head back into the
retry chain, and its key is released when it succeeds. Read from each group's own database."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.ops.errors import database_problem
from services.runtime.db import make_engine
from services.runtime.held import HeldKeys
from services.runtime.settings import Settings


def group_engine(settings: Settings, group: str) -> Engine | None:
    """The group's own database; None when it is a SQLite file that does not exist (the service
    never ran with this data folder: nothing can be held there)."""
    url = settings.database_url(group)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    return make_engine(url)


@dataclass(frozen=True)
class HeldHead:
    group: str
    key: str
    waiting: int


def _heads(settings: Settings, items, release: bool) -> tuple[list[HeldHead], list[str]]:
    by_group: dict[str, list[str]] = {}
    for item in items:
        dl = item.dead_letter
        if dl.event_id:
            by_group.setdefault(dl.topic.group.name, []).append(dl.event_id)
    found, problems = [], []
    for group, event_ids in by_group.items():
        held = HeldKeys.of_group(group)
        engine = group_engine(settings, group)
        if engine is None:
            continue
        try:
            for row in held.headed_by(engine, event_ids):
                if release:
                    held.release(engine, row["key"])
                found.append(HeldHead(group, row["key"], row["waiting"]))
        except SQLAlchemyError as exc:
            problems.append(f"{group}: {database_problem(exc)}")
        finally:
            engine.dispose()
    return found, problems


def release_purged(settings: Settings, plan) -> tuple[list[HeldHead], list[str]]:
    """Release the keys whose heads were just purged; (released, problems reading a database)."""
    return _heads(settings, [i for i in plan.items if i.action == "purge"], release=True)


def held_behind(settings: Settings, plan) -> tuple[list[HeldHead], list[str]]:
    """The keys whose heads were replayed (released when the replay succeeds) or parked (held
    until purged), with the item's action."""
    return _heads(settings, [i for i in plan.items if i.action == "replay"], release=False)


def held_heads(settings: Settings, plan) -> tuple[list[HeldHead], list[str]]:
    """Read only, for a preview: the keys a purge plan would release, or those held behind a
    replay plan's dead letters."""
    action = "purge" if plan.action == "purge" else "replay"
    return _heads(settings, [i for i in plan.items if i.action == action], release=False)

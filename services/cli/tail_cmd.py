"""`orderpipe tail TOPIC`: print a topic's events, decoded, for people and for `jq`.

It reads like an analyst would: assigned to every partition directly (no consumer group to
join, nothing committed, so it never moves anyone's offsets), decoding each value with the
schema id it carries; the declared JSON topics (`orderpipe.failures`, `orderpipe.audit`, the
order-status worker's own) are shown as JSON. A message that cannot be decoded is printed with
an "error" field, never skipped and never fatal: dead-letter topics are exactly where such
messages live.

Without --follow it stops at the end offsets seen when it started, so the output is a
snapshot that ends.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from services.ops.broker import json_default
from services.runtime.codec import Codec, DecodeError, codec_from_settings
from services.runtime.envelope import headers_to_dict
from services.runtime.settings import Settings
from services.runtime.topology import JSON_TOPICS

# One command; register it with `app.add_typer(tail_app)` (no name: `tail` joins the top level).
app = typer.Typer()

PREVIEW_BYTES = 64


@app.command("tail", no_args_is_help=True)
def tail(
    topic: Annotated[str, typer.Argument(help="Topic to read, e.g. orders.created or orders.created.email.dlt.")],
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="Start at the oldest retained message "
                                                 "(default: only messages produced from now on).")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep waiting for new messages (Ctrl-C stops); "
                                         "default: stop at the end offsets seen at start.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line: key, partition, offset, "
                                          "timestamp, headers, event_type, value (or error).")] = False,
    max_messages: Annotated[int | None, typer.Option("--max", "-n", min=1, help="Stop after N messages.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker's metadata.")] = 10.0,
) -> None:
    """Print decoded events from TOPIC (decimals as strings, times in ISO 8601)."""
    from services.ops.errors import OpsError
    from services.runtime.codec import RegistryRefused

    settings = Settings()
    try:
        printed = run_tail(settings, topic, from_beginning=from_beginning, follow=follow, as_json=as_json,
                           max_messages=max_messages, timeout=timeout)
    except (OpsError, RegistryRefused) as exc:  # a user-facing problem: one line, exit code 1
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except BrokenPipeError:  # `orderpipe tail ... | head`: the reader left, that is fine
        sys.stderr.close()
        raise typer.Exit(0) from None
    if printed == 0 and not from_beginning and not follow:
        typer.echo("no new messages; use --from-beginning to read what the topic holds, --follow to wait", err=True)


def run_tail(settings: Settings, topic: str, *, from_beginning: bool = False, follow: bool = False,
             as_json: bool = False, max_messages: int | None = None, timeout: float = 10.0,
             codec: Codec | None = None, out=None) -> int:
    """Print messages of `topic` to `out`; return how many were printed."""
    from services.ops.broker import OpsKafka, follow_from, scan, watermarks

    out = out or sys.stdout
    codec = codec or codec_from_settings(settings)
    printed = 0
    with OpsKafka(settings, timeout=timeout) as kafka:
        # librdkafka needs a group id even for assign(); a unique one that never joins or commits.
        consumer = kafka.consumer(f"orderpipe-tail-{uuid.uuid4()}")
        partitions = kafka.partitions(topic, kafka.topics(consumer))
        marks = watermarks(consumer, [(topic, p) for p in partitions], timeout)
        if follow:
            starts = {part: low if from_beginning else end for part, (low, end) in marks.items()}
            messages = follow_from(consumer, starts)
        else:  # a snapshot: from the start (or the end) to the end offsets seen now
            messages = scan(consumer, {part: (low if from_beginning else end, end) for part, (low, end) in marks.items()})
        try:
            for msg in messages:
                out.write(format_message(msg, codec, as_json) + "\n")
                printed += 1
                if max_messages is not None and printed >= max_messages:
                    break
                if follow:  # someone is watching: each line at once (a snapshot flushes at the end)
                    out.flush()
        except KeyboardInterrupt:  # the way out of --follow
            pass
        finally:
            out.flush()
            messages.close()
    return printed


def _undecodable(value: bytes | None, error: str) -> dict[str, Any]:
    return {"event_type": None, "error": error, "value_size": len(value or b""),
            "value_preview_hex": (value or b"")[:PREVIEW_BYTES].hex()}


def message_record(msg: Any, codec: Codec) -> dict[str, Any]:
    """A message as plain JSON-ready data; an undecodable value becomes an "error" field."""
    _, ts = msg.timestamp()
    key = msg.key()
    record: dict[str, Any] = {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "timestamp": datetime.fromtimestamp(ts / 1000, UTC).isoformat() if ts and ts > 0 else None,
        "key": key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key,
        "headers": headers_to_dict(msg.headers()),
    }
    value = msg.value()
    if msg.topic() in JSON_TOPICS:  # failure notices, audit records, the order-status worker's own
        try:
            record.update(event_type=None, value=json.loads(value or b""))
        except ValueError as exc:
            record.update(_undecodable(value, f"not JSON: {exc}"))
        return record
    try:
        decoded = codec.decode(value)
    except DecodeError as exc:
        record.update(_undecodable(value, str(exc)))
    except Exception as exc:  # e.g. the schema registry is unreachable: report it, keep reading
        record.update(event_type=None, error=f"{type(exc).__name__}: {exc}", value_size=len(value or b""))
    else:
        record.update(event_type=decoded.event_type, schema_id=decoded.schema_id, value=decoded.record)
    return record


def format_message(msg: Any, codec: Codec, as_json: bool) -> str:
    record = message_record(msg, codec)
    if as_json:
        return json.dumps(record, default=json_default, ensure_ascii=False)
    where = f"{record['topic']}[{record['partition']}]@{record['offset']}"
    body = (f"{record['event_type'] or 'JSON'} {json.dumps(record['value'], default=json_default, ensure_ascii=False)}"
            if "error" not in record else f"ERROR {record['error']}")
    return f"{record['timestamp'] or '-'} {where} key={record['key']} {body}"

"""`orderpipe tail TOPIC`: print a topic's events, decoded, for people and for `jq`.

It reads like an analyst would: assigned to every partition directly (no consumer group to
join, nothing committed, so it never moves anyone's offsets), decoding each value with the
schema id it carries. A message that cannot be decoded is printed with an "error" field,
never skipped and never fatal: dead-letter topics are exactly where such messages live.

Without --follow it stops at the end offsets seen when it started, so the output is a
snapshot that ends.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Annotated, Any

import typer

from services.runtime.codec import Codec, DecodeError, codec_from_settings
from services.runtime.envelope import headers_to_dict
from services.runtime.settings import Settings

# One command; register it with `app.add_typer(tail_app)` (no name: `tail` joins the top level).
app = typer.Typer()

PREVIEW_BYTES = 64


class TailError(Exception):
    """A user-facing problem: printed as one line, exit code 1."""


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
    settings = Settings()
    try:
        printed = run_tail(settings, topic, from_beginning=from_beginning, follow=follow, as_json=as_json,
                           max_messages=max_messages, timeout=timeout)
    except TailError as exc:
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
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    from services.runtime.brokers.quirks import EndOffsetsUnknown, end_offsets

    out = out or sys.stdout
    if not settings.kafka_bootstrap_servers:
        raise TailError("KAFKA_BOOTSTRAP_SERVERS is not set; export it (host:port of your Kafka cluster)")
    codec = codec or codec_from_settings(settings.schema_registry_url)
    errors: list[str] = []
    printed = 0
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        **settings.extra_client_config,
        # librdkafka needs a group id even for assign(); a unique one that never joins or commits.
        "group.id": f"orderpipe-tail-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",  # what every consumer of the pipeline sees
        "enable.partition.eof": True,  # the end of a partition, even when it ends in a transaction marker
        "log_level": 0,  # connection errors come back through error_cb and the exception below
        "error_cb": lambda e: errors.append(str(e)),
    })
    try:
        try:
            metadata = consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
            raise TailError(f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {reason}"
                            + (f" ({errors[-1]})" if errors else "")) from None
        meta = metadata.topics.get(topic)
        if meta is None or (meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise TailError(f"topic {topic!r} does not exist (see `orderpipe topics list`)")
        if meta.error is not None:
            raise TailError(f"topic {topic!r}: {meta.error.str()}")
        partitions = sorted(meta.partitions)
        try:
            marks = end_offsets(consumer, [(topic, p) for p in partitions], timeout)
        except EndOffsetsUnknown as exc:
            raise TailError(str(exc)) from None
        ends = {p: high for (_, p), (_, high) in marks.items()}
        starts = [TopicPartition(topic, p, OFFSET_BEGINNING if from_beginning else ends[p]) for p in partitions]
        # A partition is done when we reached the end seen at start (or its EOF, which in
        # read_committed mode can come earlier, at the last stable offset).
        pending = {p for p in partitions if follow or (from_beginning and ends[p] > 0)}
        consumer.assign(starts)
        while pending and (max_messages is None or printed < max_messages):
            for msg in consumer.consume(500, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if not follow:
                            pending.discard(msg.partition())
                    else:
                        print(f"warning: {err.str()}", file=sys.stderr)
                    continue
                p = msg.partition()
                if not follow and p not in pending:
                    continue  # already at its end (a fetch can run past the EOF we acted on)
                if not follow and msg.offset() >= ends[p]:
                    pending.discard(p)
                    continue
                out.write(format_message(msg, codec, as_json) + "\n")
                printed += 1
                if not follow and msg.offset() + 1 >= ends[p]:
                    pending.discard(p)
                if max_messages is not None and printed >= max_messages:
                    break
            out.flush()
        return printed
    except KeyboardInterrupt:  # the way out of --follow
        return printed
    finally:
        consumer.close()


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
    try:
        decoded = codec.decode(value)
    except DecodeError as exc:
        record.update(event_type=None, error=str(exc), value_size=len(value or b""),
                      value_preview_hex=(value or b"")[:PREVIEW_BYTES].hex())
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
    body = (f"{record['event_type']} {json.dumps(record['value'], default=json_default, ensure_ascii=False)}"
            if "error" not in record else f"ERROR {record['error']}")
    return f"{record['timestamp'] or '-'} {where} key={record['key']} {body}"


def json_default(value: Any) -> Any:
    """Avro logical types as analysts expect them: decimals as exact strings, times as ISO 8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")

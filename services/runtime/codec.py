"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro binary.

Two registries sit behind one interface:
- `EmbeddedRegistry` reads the ids from `schemas/registry.json`: no server, and any message
  ever produced in embedded mode decodes from the repository alone;
- `ConfluentRegistry` talks to a Confluent-compatible Schema Registry (`SCHEMA_REGISTRY_URL`):
  register on first produce, fetch by id on consume, both cached.

Consumers decode with the writer's schema and, when they ask for a reader version, resolve it
to that version (Avro schema resolution), which is what makes v1 consumers read v2 events.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import fastavro

MAGIC_BYTE = 0
_MAX_PLANS = 1024  # (schema id, reader version) pairs a Codec remembers
_HEADER = struct.Struct(">bI")
SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
NAMESPACE = "orderpipe.events"
# Folders of the schemas services bring along (services/runtime/contracts.py), each with its own
# registry.json; read with SCHEMAS_DIR by every EmbeddedRegistry made after they were added.
_EXTRA_SCHEMA_DIRS: list[Path] = []


def add_schemas_dir(folder: Path) -> None:
    if folder not in _EXTRA_SCHEMA_DIRS:
        _EXTRA_SCHEMA_DIRS.append(folder)


def remove_schemas_dir(folder: Path) -> None:
    if folder in _EXTRA_SCHEMA_DIRS:
        _EXTRA_SCHEMA_DIRS.remove(folder)


class DecodeError(ValueError):
    """The bytes are not a message we can read. Always permanent: retrying cannot help."""


@dataclass(frozen=True)
class SchemaVersion:
    id: int
    subject: str
    version: int
    schema: dict[str, Any]  # the parsed JSON, as written in the .avsc

    @property
    def event_type(self) -> str:
        return self.subject.rsplit(".", 1)[-1]


class Registry(Protocol):
    def latest(self, event_type: str) -> SchemaVersion: ...
    def version(self, event_type: str, version: int) -> SchemaVersion: ...
    def by_id(self, schema_id: int) -> SchemaVersion: ...


def subject_for(event_type: str) -> str:
    return f"{NAMESPACE}.{event_type}"


class EmbeddedRegistry:
    """Schema ids from the checked-in manifest (and those of services' own schemas); nothing to run."""

    def __init__(self, schemas_dir: Path = SCHEMAS_DIR):
        self._by_id: dict[int, SchemaVersion] = {}
        for folder in dict.fromkeys([schemas_dir, *_EXTRA_SCHEMA_DIRS]):
            manifest = json.loads((folder / "registry.json").read_text())
            for entry in manifest["schemas"]:
                known = self._by_id.get(entry["id"])
                if known is not None:
                    raise ValueError(f"schema id {entry['id']} of {folder / entry['file']} is taken by {known.subject} "
                                     f"v{known.version}: give it an id of its own")
                schema = json.loads((folder / entry["file"]).read_text())
                self._by_id[entry["id"]] = SchemaVersion(entry["id"], entry["subject"], entry["version"], schema)
        self._version_cache: dict[tuple[str, int], SchemaVersion] = {}
        self._latest_cache: dict[str, SchemaVersion] = {}

    def all(self) -> list[SchemaVersion]:
        return sorted(self._by_id.values(), key=lambda s: s.id)

    def by_id(self, schema_id: int) -> SchemaVersion:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise DecodeError(f"unknown schema id {schema_id}") from None

    def versions(self, event_type: str) -> list[SchemaVersion]:
        subject = subject_for(event_type)
        return sorted((s for s in self._by_id.values() if s.subject == subject), key=lambda s: s.version)

    def version(self, event_type: str, version: int) -> SchemaVersion:
        # Called for every message encoded or decoded: answered from a dict after the first time.
        found = self._version_cache.get((event_type, version))
        if found is None:
            for s in self.versions(event_type):
                if s.version == version:
                    found = self._version_cache[(event_type, version)] = s
                    break
            else:
                raise KeyError(f"no schema for {event_type} v{version}")
        return found

    def latest(self, event_type: str) -> SchemaVersion:
        found = self._latest_cache.get(event_type)
        if found is None:
            versions = self.versions(event_type)
            if not versions:
                raise KeyError(f"no schema for event type {event_type!r}")
            found = self._latest_cache[event_type] = versions[-1]
        return found


class RegistryRefused(RuntimeError):
    """The Schema Registry refused our login (HTTP 401 or 403): no retry can fix that, so the
    process stops with this one line (the credentials themselves are never in it)."""


class RegistryUnavailable(ConnectionError):
    """The Schema Registry did not answer a lookup: retryable, unlike an id it does not know."""


def without_userinfo(url: str) -> str:
    """The URL as it may be printed: a user:password@ in it is dropped."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


class ConfluentRegistry:
    """A Confluent-compatible Schema Registry; the .avsc files stay the source of truth.
    `user_info` ("USER:PASSWORD") is its basic auth; credentials in the URL work too."""

    def __init__(self, url: str, local: EmbeddedRegistry | None = None, client=None, user_info: str | None = None):
        from confluent_kafka.schema_registry import SchemaRegistryClient  # only needed in this mode

        self.url = without_userinfo(url)
        conf = {"url": url, **({"basic.auth.user.info": user_info} if user_info else {})}
        # new_client() honours mock:// URLs (confluent-kafka's in-process registry, used in tests)
        self._client = client or SchemaRegistryClient.new_client(conf)
        self._local = local or EmbeddedRegistry()
        self._registered: dict[tuple[str, int], SchemaVersion] = {}
        self._by_id: dict[int, SchemaVersion] = {}

    def _register(self, local: SchemaVersion) -> SchemaVersion:
        from confluent_kafka.schema_registry import Schema

        key = (local.subject, local.version)
        if key not in self._registered:
            schema_id = self._client.register_schema(local.subject, Schema(json.dumps(local.schema), "AVRO"))
            remote = SchemaVersion(schema_id, local.subject, local.version, local.schema)
            self._registered[key] = self._by_id[schema_id] = remote
        return self._registered[key]

    def latest(self, event_type: str) -> SchemaVersion:
        return self._register(self._local.latest(event_type))

    def version(self, event_type: str, version: int) -> SchemaVersion:
        return self._register(self._local.version(event_type, version))

    def check(self) -> None:
        """Ask once at start (list the subjects): RegistryRefused when the login is refused, so
        a wrong password stops the process with one line instead of failing every message.
        A registry that does not answer is asked again when a message needs it."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            self._client.get_subjects()
        except SchemaRegistryError as exc:
            if exc.http_status_code in (401, 403):
                # A refusal without a JSON body (Apicurio's is empty) leaves confluent-kafka no message
                # (error code -1, "Unknown Schema Registry Error: b''"): say what the status says.
                reason = exc.error_message if exc.error_code != -1 else HTTPStatus(exc.http_status_code).phrase
                raise RegistryRefused(
                    f"the Schema Registry at {self.url} refused the login: {reason} "
                    f"(HTTP {exc.http_status_code}; check SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO)") from None
        except Exception:  # unreachable now: the lookups that need it retry
            pass

    def by_id(self, schema_id: int) -> SchemaVersion:
        if schema_id not in self._by_id:
            from confluent_kafka.schema_registry.error import SchemaRegistryError

            try:
                schema = self._client.get_schema(schema_id)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:  # the message names an id no one registered
                    raise DecodeError(f"unknown schema id {schema_id}: {exc}") from None
                raise RegistryUnavailable(f"Schema Registry at {self.url}: schema id {schema_id}: {exc}") from None
            except Exception as exc:  # connection refused, timeout: try again later, not a dead letter
                raise RegistryUnavailable(f"Schema Registry at {self.url}: schema id {schema_id}: "
                                          f"{type(exc).__name__}") from None
            parsed = json.loads(schema.schema_str)
            subject = f"{parsed.get('namespace', NAMESPACE)}.{parsed['name']}"
            self._by_id[schema_id] = SchemaVersion(schema_id, subject, 0, parsed)
        return self._by_id[schema_id]


@dataclass(frozen=True)
class Decoded:
    event_type: str
    schema_id: int
    record: dict[str, Any]


class Codec:
    def __init__(self, registry: Registry):
        self.registry = registry
        self._parsed: dict[int, Any] = {}
        self._plans: dict[tuple, tuple] = {}  # (schema id, reader version) -> _plan()

    def _parsed_schema(self, sv: SchemaVersion) -> Any:
        parsed = self._parsed.get(sv.id)
        if parsed is None:
            parsed = self._parsed[sv.id] = fastavro.parse_schema(sv.schema)
        return parsed

    def encode(self, event_type: str, record: dict[str, Any], version: int | None = None) -> bytes:
        sv = self.registry.latest(event_type) if version is None else self.registry.version(event_type, version)
        out = io.BytesIO()
        out.write(_HEADER.pack(MAGIC_BYTE, sv.id))
        fastavro.schemaless_writer(out, self._parsed_schema(sv), record)
        return out.getvalue()

    def decode(self, data: bytes | None, reader_version: int | Mapping[str, int] | None = None) -> Decoded:
        """Decode any message; every failure is a `DecodeError` with a reason fit for a DLT header.

        `reader_version` is the version to read as: one number, or one per event type (what a
        consumer built on given models understands)."""
        if data is None or len(data) < _HEADER.size:
            raise DecodeError(f"not in the Confluent wire format: {0 if data is None else len(data)} bytes")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise DecodeError(f"not in the Confluent wire format: magic byte {magic}, expected 0")
        # A consumer passes the same mapping every time (READER_VERSIONS): its identity is the
        # cache key, and the plan keeps it alive, so the id cannot be reused while cached.
        by = reader_version if reader_version is None or type(reader_version) is int else id(reader_version)
        plan = self._plans.get((schema_id, by))
        if plan is None or plan[3] is not reader_version:
            if len(self._plans) >= _MAX_PLANS:  # callers passing a new mapping each time
                self._plans.clear()
            plan = self._plans[(schema_id, by)] = self._plan(schema_id, reader_version)
        event_type, writer, reader, _ = plan
        payload = io.BytesIO(data)
        payload.seek(_HEADER.size)
        try:
            record = fastavro.schemaless_reader(payload, writer, reader)
        except Exception as exc:  # fastavro raises many types on corrupt input (EOFError, ValueError, ...)
            raise DecodeError(f"payload does not decode with schema id {schema_id}: {type(exc).__name__}: {exc}") from None
        if payload.tell() != len(data):
            raise DecodeError(f"payload has {len(data) - payload.tell()} trailing bytes after schema id {schema_id}")
        return Decoded(event_type, schema_id, record)

    def _plan(self, schema_id: int, reader_version: int | Mapping[str, int] | None) -> tuple:
        """(event type, writer schema, reader schema or None, the reader_version asked for).

        The reader is None when it is the writer's own schema: fastavro then skips schema
        resolution, which is most of the time for consumers on the current version."""
        writer = self.registry.by_id(schema_id)
        wanted = reader_version.get(writer.event_type) if isinstance(reader_version, Mapping) else reader_version
        reader = None
        if wanted is not None:
            try:
                reader_sv = self.registry.version(writer.event_type, wanted)
            except KeyError:
                raise DecodeError(f"schema id {schema_id} is {writer.event_type}, which has no "
                                  f"version {wanted} to read it as") from None
            if reader_sv.schema != writer.schema:
                reader = self._parsed_schema(reader_sv)
        return writer.event_type, self._parsed_schema(writer), reader, reader_version


def codec_from_settings(settings) -> Codec:
    """The process's codec: the registry SCHEMA_REGISTRY_URL names (its login checked now,
    RegistryRefused if refused), else the embedded one. `settings` is a runtime Settings."""
    if not settings.schema_registry_url:
        return Codec(EmbeddedRegistry())
    user_info = settings.schema_registry_basic_auth_user_info
    registry = ConfluentRegistry(settings.schema_registry_url,
                                 user_info=user_info.get_secret_value() if user_info else None)
    registry.check()
    return Codec(registry)

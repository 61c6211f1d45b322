"""Schema evolution rules, checked the way CI and `orderpipe schemas check` see them.

Two families of checks over `schemas/`:
- the manifest (`registry.json`): every .avsc listed exactly once, ids unique, versions
  1..n per subject, each file's record full name equal to its subject. Ids are what old
  messages carry on the wire, so an id must never change meaning: with a baseline (the
  manifest at another git ref) we also check that no id was removed, renumbered or edited;
- BACKWARD_TRANSITIVE compatibility per subject with the `avro` package's
  `ReaderWriterCompatibilityChecker`: every newer version, as reader, must read every older
  version, as writer, so a consumer upgraded to the latest schema still reads the whole topic.

The checker compares Avro types only; it calls a decimal with scale 2 and one with scale 3
compatible (both are bytes), which would silently multiply money by ten. Logical types of
matching fields are therefore compared as well.

Every problem names the subject, the versions and the field, so a failing CI line says what
to fix.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import avro.errors
import avro.schema
import fastavro
from avro.compatibility import (
    ReaderWriterCompatibilityChecker, SchemaCompatibilityResult, SchemaCompatibilityType, SchemaIncompatibilityType,
    SchemaType, lookup_writer_field, schema_name_equals,
)

from services.runtime.codec import SCHEMAS_DIR

MANIFEST = "registry.json"


@dataclass(frozen=True)
class Problem:
    subject: str  # or the file name when the problem is not tied to a subject
    message: str
    field: str = ""  # dotted path in the reader schema, e.g. "lines[].quantity"
    reader_version: int | None = None
    writer_version: int | None = None

    def __str__(self) -> str:
        where = self.subject
        if self.reader_version is not None:
            where += f" v{self.reader_version} (reader) vs v{self.writer_version} (writer)"
        field = f" field '{self.field}':" if self.field else ""
        return f"{where}:{field} {self.message}"


@dataclass(frozen=True)
class Entry:
    id: int
    subject: str
    version: int
    file: str


# -- loading -----------------------------------------------------------------------------------

def load_entries(schemas_dir: Path = SCHEMAS_DIR) -> list[Entry]:
    """The manifest's entries; raises ValueError with a readable message if it is malformed."""
    path = schemas_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    entries = []
    for i, raw in enumerate(manifest.get("schemas", []) if isinstance(manifest, dict) else []):
        try:
            entry = Entry(raw["id"], raw["subject"], raw["version"], raw["file"])
        except (KeyError, TypeError):
            raise ValueError(f"{path}: entry {i} needs id, subject, version and file: {raw!r}") from None
        if not (isinstance(entry.id, int) and isinstance(entry.version, int) and entry.id > 0 and entry.version > 0):
            raise ValueError(f"{path}: entry {i} needs a positive integer id and version: {raw!r}")
        entries.append(entry)
    return entries


def parse_avro(text: str) -> avro.schema.Schema:
    """Parse with the `avro` package, treating an ignored logical type as an error: avro only
    warns when, say, a decimal's scale exceeds its precision, and then reads plain bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", avro.errors.IgnoredLogicalType)
        return avro.schema.parse(text)


def subjects(schemas_dir: Path = SCHEMAS_DIR) -> dict[str, list[Entry]]:
    """Subject -> its entries ordered by version."""
    by_subject: dict[str, list[Entry]] = defaultdict(list)
    for entry in load_entries(schemas_dir):
        by_subject[entry.subject].append(entry)
    return {s: sorted(es, key=lambda e: e.version) for s, es in sorted(by_subject.items())}


# -- the manifest ------------------------------------------------------------------------------

def check_manifest(schemas_dir: Path = SCHEMAS_DIR) -> list[Problem]:
    try:
        entries = load_entries(schemas_dir)
    except ValueError as exc:
        return [Problem(MANIFEST, str(exc))]
    problems: list[Problem] = []
    listed: dict[str, int] = defaultdict(int)
    for e in entries:
        listed[e.file] += 1
    on_disk = {p.name for p in schemas_dir.glob("*.avsc")}
    for name in sorted(on_disk - listed.keys()):
        problems.append(Problem(name, f"not listed in {MANIFEST}: add it with the next free id"))
    for name, count in sorted(listed.items()):
        if name not in on_disk:
            problems.append(Problem(name, f"listed in {MANIFEST} but the file does not exist"))
        if count > 1:
            problems.append(Problem(name, f"listed {count} times in {MANIFEST}"))

    by_id: dict[int, list[Entry]] = defaultdict(list)
    for e in entries:
        by_id[e.id].append(e)
    for schema_id, same in sorted(by_id.items()):
        if len(same) > 1:
            problems.append(Problem(same[0].subject, f"id {schema_id} is used {len(same)} times "
                                    f"({', '.join(e.file for e in same)}); ids are permanent, give each its own"))

    for subject, versions in subjects(schemas_dir).items():
        numbers = [e.version for e in versions]
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(Problem(subject, f"versions must be 1..{len(numbers)} without gaps or repeats, "
                                    f"found {numbers}"))

    for e in entries:
        if e.file in on_disk:
            problems += _check_file(schemas_dir, e)
    return problems


def _check_file(schemas_dir: Path, e: Entry) -> list[Problem]:
    text = (schemas_dir / e.file).read_text()
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        return [Problem(e.subject, f"{e.file} is not valid JSON: {exc}")]
    try:
        parsed = parse_avro(text)
        fastavro.parse_schema(schema)
    except Exception as exc:  # both parsers raise their own exception types for bad schemas
        return [Problem(e.subject, f"{e.file} is not a valid Avro schema: {type(exc).__name__}: {exc}")]
    problems = []
    fullname = getattr(parsed, "fullname", None)
    if parsed.type != "record" or fullname != e.subject:
        problems.append(Problem(e.subject, f"{e.file} defines {fullname or parsed.type!r}, expected a record "
                                f"named {e.subject!r} (subject = record full name)"))
    expected = f"{e.subject.rsplit('.', 1)[-1]}.v{e.version}.avsc"
    if e.file != expected:
        problems.append(Problem(e.subject, f"file {e.file} should be named {expected}"))
    return problems


def check_against_baseline(schemas_dir: Path, baseline: list[Entry], baseline_schemas: dict[str, Any]) -> list[Problem]:
    """Ids are permanent: every id of the baseline keeps its subject, version, file and schema.

    `baseline_schemas` maps a baseline file name to its parsed JSON. Docs may change; nothing
    else in a published version may, since messages written with it are still in the topics.
    """
    try:
        current = {e.id: e for e in load_entries(schemas_dir)}
    except ValueError as exc:
        return [Problem(MANIFEST, str(exc))]
    problems = []
    for old in baseline:
        new = current.get(old.id)
        if new is None:
            problems.append(Problem(old.subject, f"id {old.id} ({old.file}) was removed from {MANIFEST}; "
                                    "messages written with it could no longer be decoded"))
        elif (new.subject, new.version, new.file) != (old.subject, old.version, old.file):
            problems.append(Problem(old.subject, f"id {old.id} was {old.subject} v{old.version} ({old.file}), "
                                    f"now {new.subject} v{new.version} ({new.file}); ids are never reused"))
        elif old.file in baseline_schemas and (schemas_dir / new.file).exists():
            try:
                now = json.loads((schemas_dir / new.file).read_text())
            except json.JSONDecodeError:
                continue  # reported by check_manifest
            if _without_docs(now) != _without_docs(baseline_schemas[old.file]):
                problems.append(Problem(old.subject, f"{old.file} (id {old.id}) was edited after it was published; "
                                        f"add a new version instead"))
    return problems


def baseline_from_git(ref: str, schemas_dir: Path = SCHEMAS_DIR) -> tuple[list[Entry], dict[str, Any]]:
    """The manifest and schemas as they are at a git ref (e.g. origin/main)."""
    root = Path(_git(schemas_dir, "rev-parse", "--show-toplevel").strip())
    rel = schemas_dir.resolve().relative_to(root.resolve()).as_posix()
    manifest = json.loads(_git(schemas_dir, "show", f"{ref}:{rel}/{MANIFEST}"))
    entries = [Entry(r["id"], r["subject"], r["version"], r["file"]) for r in manifest.get("schemas", [])]
    schemas = {}
    for e in entries:
        try:
            schemas[e.file] = json.loads(_git(schemas_dir, "show", f"{ref}:{rel}/{e.file}"))
        except (ValueError, json.JSONDecodeError):
            pass
    return entries, schemas


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _without_docs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_docs(v) for k, v in node.items() if k != "doc"}
    if isinstance(node, list):
        return [_without_docs(v) for v in node]
    return node


# -- compatibility -----------------------------------------------------------------------------

def check_compatibility(schemas_dir: Path = SCHEMAS_DIR) -> list[Problem]:
    """BACKWARD_TRANSITIVE per subject: each version reads every older one."""
    try:
        by_subject = subjects(schemas_dir)
    except ValueError as exc:
        return [Problem(MANIFEST, str(exc))]
    problems: list[Problem] = []
    for subject, entries in by_subject.items():
        parsed: dict[int, avro.schema.Schema] = {}
        for e in entries:
            try:
                parsed[e.version] = parse_avro((schemas_dir / e.file).read_text())
            except Exception:  # missing or invalid files are reported by check_manifest
                continue
        versions = sorted(parsed)
        for i, reader_v in enumerate(versions):
            for writer_v in versions[:i]:
                for field, message in incompatibilities(parsed[reader_v], parsed[writer_v]):
                    problems.append(Problem(subject, message, field, reader_v, writer_v))
    return problems


def check_all(schemas_dir: Path = SCHEMAS_DIR, against: str | None = None) -> list[Problem]:
    try:
        load_entries(schemas_dir)
    except ValueError as exc:
        return [Problem(MANIFEST, str(exc))]  # nothing else can be checked without it
    problems = check_manifest(schemas_dir) + check_compatibility(schemas_dir)
    if against:
        try:
            baseline, schemas = baseline_from_git(against, schemas_dir)
        except (ValueError, json.JSONDecodeError) as exc:
            return problems + [Problem(MANIFEST, f"cannot read the baseline at {against!r}: {exc}")]
        problems += check_against_baseline(schemas_dir, baseline, schemas)
    return problems


def incompatibilities(reader: avro.schema.Schema, writer: avro.schema.Schema) -> list[tuple[str, str]]:
    """(field path, message) for every reason `reader` cannot read data written with `writer`."""
    checker = _LocatingChecker()
    result = checker.get_compatibility(reader, writer)
    found = list(checker.leaves)
    if result.compatibility is SchemaCompatibilityType.incompatible and not found:
        # Should not happen; never let a failure pass without a line.
        found = [(loc, msg) for loc, msg in zip(sorted(result.locations), sorted(result.messages))]
    found += _logical_type_changes(reader, writer, "")
    return list(dict.fromkeys(found))  # keep order, drop repeats


class _LocatingChecker(ReaderWriterCompatibilityChecker):
    """The avro checker, recording each incompatibility with the reader field it concerns.

    The stock result merges all findings into unordered sets of messages and JSON-pointer
    locations (by field index), which cannot be paired once there are two. Every recursive
    step goes through `get_compatibility`, so we keep our own path of field names there and
    record the leaf findings as they are made.
    """

    def __init__(self):
        super().__init__()
        self.leaves: list[tuple[str, str]] = []
        self._path: list[str] = []
        self._readers: list[avro.schema.Schema] = []

    def get_compatibility(self, reader, writer, reference_token=ReaderWriterCompatibilityChecker.ROOT_REFERENCE_TOKEN,
                          location=None):
        step = ""
        if location and len(location) >= 2 and location[-2] == "fields" and self._readers:
            step = "." + self._readers[-1].fields[int(location[-1])].name
        elif reference_token == "items":
            step = "[]"
        elif reference_token == "values":
            step = "{}"
        self._path.append(step)
        self._readers.append(reader)
        try:
            return super().get_compatibility(reader, writer, reference_token, location)
        finally:
            self._path.pop()
            self._readers.pop()

    def calculate_compatibility(self, reader, writer, location) -> SchemaCompatibilityResult:
        mark = len(self.leaves)
        result = super().calculate_compatibility(reader, writer, location)
        incompatible = result.compatibility is SchemaCompatibilityType.incompatible
        if reader.type == writer.type and reader.type in (SchemaType.RECORD, SchemaType.ARRAY, SchemaType.MAP):
            # Children's findings are merged into this result: keep them, add the record's own.
            if reader.type == SchemaType.RECORD and not schema_name_equals(reader, writer):
                self.leaves.append((self.where(), f"record renamed: reader is {reader.fullname}, writer "
                                                  f"{writer.fullname} (add the old name to the reader's aliases)"))
        elif writer.type == SchemaType.UNION and reader.type != SchemaType.UNION:
            pass  # every writer branch's result is merged as it is: its findings stand
        else:
            # A leaf, or a reader union: the checker tried branches and kept only its own verdict,
            # so findings made while probing branches are not reasons.
            del self.leaves[mark:]
            if incompatible:
                for message in sorted(result.messages):
                    self.leaves.append((self.where(), _explain(result.incompatibilities, message, reader, writer)))
        return result

    def check_reader_writer_record_fields(self, reader, writer, location) -> SchemaCompatibilityResult:
        for f in reader.fields:
            if lookup_writer_field(writer, f) is None and not f.has_default and f.type.type != SchemaType.ENUM:
                path = ("".join(self._path) + "." + f.name).lstrip(".")
                self.leaves.append((path, f"new field '{f.name}' has no default, so this version cannot read "
                                          f"events written without it (give it a default, e.g. "
                                          f"\"type\": [\"null\", ...], \"default\": null)"))
        return super().check_reader_writer_record_fields(reader, writer, location)

    def where(self) -> str:
        return "".join(self._path).lstrip(".") or "(root)"


def _explain(kinds: list[SchemaIncompatibilityType], message: str, reader, writer) -> str:
    if kinds == [SchemaIncompatibilityType.reader_field_missing_default_value]:
        return f"new field '{message}' has no default, so this version cannot read events written without it"
    if SchemaIncompatibilityType.missing_enum_symbols in kinds and message.startswith("{"):
        return f"enum {getattr(reader, 'fullname', '')} lacks the writer's symbols {message}"
    if SchemaIncompatibilityType.type_mismatch in kinds or SchemaIncompatibilityType.missing_union_branch in kinds:
        return f"type changed: {message} ({_describe(writer)} cannot be read as {_describe(reader)})"
    return message


def _describe(s: avro.schema.Schema) -> str:
    if s.type == SchemaType.UNION:
        return "[" + ", ".join(_describe(b) for b in s.schemas) + "]"
    logical = s.get_prop("logicalType")
    name = getattr(s, "fullname", None) if s.type in (SchemaType.RECORD, SchemaType.ENUM, SchemaType.FIXED) else None
    return name or (f"{s.type}/{logical}" if logical else str(s.type))


def _logical_type_changes(reader, writer, path: str) -> Iterator[tuple[str, str]]:
    """Logical types the avro checker does not look at, on fields present in both versions."""
    if reader.type == SchemaType.UNION or writer.type == SchemaType.UNION:
        rs = reader.schemas if reader.type == SchemaType.UNION else [reader]
        ws = writer.schemas if writer.type == SchemaType.UNION else [writer]
        for r in rs:
            for w in ws:
                if r.type == w.type and getattr(r, "fullname", None) == getattr(w, "fullname", None):
                    yield from _logical_type_changes(r, w, path)
        return
    if reader.type != writer.type:
        return  # a type change is the checker's finding
    if reader.type == SchemaType.RECORD:
        for f in reader.fields:
            wf = lookup_writer_field(writer, f)
            if wf is not None:
                yield from _logical_type_changes(f.type, wf.type, f"{path}.{f.name}".lstrip("."))
        return
    if reader.type == SchemaType.ARRAY:
        yield from _logical_type_changes(reader.items, writer.items, path + "[]")
        return
    if reader.type == SchemaType.MAP:
        yield from _logical_type_changes(reader.values, writer.values, path + "{}")
        return
    r_lt, w_lt = reader.get_prop("logicalType"), writer.get_prop("logicalType")
    where = path or "(root)"
    if r_lt != w_lt:
        yield where, f"logical type changed from {w_lt or 'none'} to {r_lt or 'none'}: old values would be misread"
    elif r_lt == "decimal":
        if (reader.get_prop("scale") or 0) != (writer.get_prop("scale") or 0):
            yield where, (f"decimal scale changed from {writer.get_prop('scale') or 0} to "
                          f"{reader.get_prop('scale') or 0}: old amounts would be misread")
        if (reader.get_prop("precision") or 0) < (writer.get_prop("precision") or 0):
            yield where, (f"decimal precision lowered from {writer.get_prop('precision')} to "
                          f"{reader.get_prop('precision')}: old amounts may not fit")

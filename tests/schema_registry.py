"""A real Confluent-compatible Schema Registry that requires HTTP basic auth, for the tests of our
client's login (`SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`): Apicurio Registry 2.4.2.Final, assembled
from Maven Central, serving its Confluent API (`/apis/ccompat/v7`) on 127.0.0.1.

Why Apicurio 2.4.2: Confluent's own registry is not on Maven Central and Karapace is not on PyPI;
of Apicurio, 2.6.x and 3.x have dependencies that are not all on Maven Central here (2.6.13's
`apicurio-registry-schema-util-provider`, for one, is only in repositories this machine cannot
reach; 3.x also needs Java 21), while every jar of 2.4.2.Final is on Maven Central (one Quarkus
extension in an older version, one library under its Maven Central coordinates: see the
comments in tests/apicurio/pom.xml).

Why Quarkus basic auth: Apicurio's own auth (`registry.auth.enabled`) needs an OIDC server
(Keycloak), so it stays off, and Quarkus itself requires a login on every path with the users
given at start (tests/apicurio/application.properties). A wrong or missing login is answered
401 with an empty body, an unknown schema id 404 with error code 40403; schema ids are
Apicurio's content ids (one per distinct schema: the same schema registered again keeps its
id). Storage is an in-memory H2 database: each registry starts empty and forgets all on exit.

The Maven project (tests/apicurio/pom.xml, and application.properties as its
src/main/resources/application.properties) is built once, like the local Apache Kafka
(services/tools/brokers/apache_kafka.py), into a folder under the same cache
(`ORDERPIPE_CACHE_DIR`, else `~/.cache/orderpipe`) named by a hash of the two files, and
reused: about 40 s the first time with a cold ~/.m2, 15-20 s with a warm one, nothing after.
Test processes running at once build it once (a file lock, then an atomic rename).

A real registry does not record which user read what; it does record who registered each
version (Apicurio's `createdBy`, the login's name): `created_by(subject)`.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx

from services.tools.brokers.apache_kafka import cache_dir as _kafka_cache_dir
from services.tools.brokers.apache_kafka import java_major_version
from services.tools.brokers.probe import free_port
from services.tools.supervisor import die_with_parent

PROJECT = Path(__file__).resolve().parent / "apicurio"  # pom.xml, application.properties
MIN_JAVA = 17
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
BUILD_TIMEOUT = 1800


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class SchemaRegistryUnavailable(RuntimeError):
    """Java or Maven is missing, the registry could not be built, or it did not start."""


def apicurio_version() -> str:
    found = re.search(r"<apicurio.version>([^<]+)</apicurio.version>", (PROJECT / "pom.xml").read_text())
    return found.group(1) if found else "unknown"


def cache_dir() -> Path:
    """The built registry (a Quarkus fast-jar folder), outside any repository and shared by every
    clone, beside the local Apache Kafka's jars; a new folder whenever pom.xml or
    application.properties change."""
    digest = hashlib.sha256()
    for name in ("pom.xml", "application.properties"):
        digest.update(name.encode() + b"\0" + (PROJECT / name).read_bytes() + b"\0")
    return _kafka_cache_dir().parent / f"apicurio-registry-{apicurio_version()}-{digest.hexdigest()[:16]}"


def _check_tools() -> None:
    major = java_major_version()
    if major is None:
        raise SchemaRegistryUnavailable(f"the test Schema Registry (Apicurio) needs Java {MIN_JAVA} or newer: no "
                                        "`java` on PATH (install OpenJDK 17, e.g. `apt-get install "
                                        "openjdk-17-jdk-headless`)")
    if major < MIN_JAVA:
        raise SchemaRegistryUnavailable(f"the test Schema Registry (Apicurio) needs Java {MIN_JAVA} or newer, "
                                        f"`java` on PATH is Java {major} (install OpenJDK 17 and put it first on "
                                        "PATH)")
    if shutil.which("mvn") is None:
        raise SchemaRegistryUnavailable("the test Schema Registry (Apicurio) is built from Maven Central by Maven: no "
                                        "`mvn` on PATH (install it, e.g. `apt-get install maven`)")


def registry_app(progress: Callable[[str], None] = _stderr) -> Path:
    """The folder holding `quarkus-run.jar`, built by Maven on first use (about 133 MB). Safe when
    several processes ask at once: one builds, the others wait and then use its result."""
    target = cache_dir()
    if (target / "quarkus-run.jar").exists():
        return target
    _check_tools()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "quarkus-run.jar").exists():
            return target
        progress(f"building Apicurio Registry {apicurio_version()} from Maven Central into {target} (once)")
        started = time.monotonic()
        build_log = target.parent / f"{target.name}.build.log"
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as work:
            project = Path(work)
            shutil.copyfile(PROJECT / "pom.xml", project / "pom.xml")
            resources = project / "src" / "main" / "resources"
            resources.mkdir(parents=True)
            shutil.copyfile(PROJECT / "application.properties", resources / "application.properties")
            try:
                result = subprocess.run(["mvn", "-B", "-q", "package", "-DskipTests"], cwd=project,
                                        stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                        timeout=BUILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise SchemaRegistryUnavailable(
                    f"Maven did not build Apicurio Registry within {BUILD_TIMEOUT} s") from None
            build_log.write_text(result.stdout + result.stderr)
            built = project / "target" / "quarkus-app"
            if result.returncode != 0 or not (built / "quarkus-run.jar").exists():
                tail = " ".join((result.stdout + result.stderr).split())[-600:]
                raise SchemaRegistryUnavailable(f"Maven could not build Apicurio Registry {apicurio_version()} "
                                                f"(see {build_log}): {tail}")
            if target.exists():  # a leftover without quarkus-run.jar
                shutil.rmtree(target)
            built.rename(target)  # whole or not at all: a killed build leaves no half folder
        progress(f"built Apicurio Registry {apicurio_version()} in {time.monotonic() - started:.0f} s")
    return target


def _properties_key(text: str) -> str:
    """A config key segment: quoted, so that user names with dots stay one map key."""
    if not re.fullmatch(r"[A-Za-z0-9_.@+-]+", text):
        raise ValueError(f"user name {text!r}: use letters, digits and _ . @ + - only")
    return f'"{text}"'


def _properties_value(text: str) -> str:
    """A .properties value that reads back as `text` (and `$` is no config expression)."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "$":
            out.append("\\\\$")  # the file's parser leaves \$, which SmallRye Config reads as $
        elif ch in " #!=:":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif not " " <= ch <= "~":  # \uXXXX, UTF-16 code units (a surrogate pair beyond the BMP)
            units = ch.encode("utf-16-be")
            out.append("".join(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2)))
        else:
            out.append(ch)
    return "".join(out)


class SchemaRegistry:
    """`with SchemaRegistry({"user": "password"}) as registry:` serves the Confluent API on
    `registry.url` (http://127.0.0.1:PORT/apis/ccompat/v7, what SCHEMA_REGISTRY_URL names), and
    only to those users. The Java process is stopped on exit (SIGTERM to its process group,
    SIGKILL past 20 s), and dies with this process in any case."""

    def __init__(self, users: dict[str, str], progress: Callable[[str], None] = _stderr):
        if not users:
            raise ValueError("a registry that requires a login needs at least one user")
        self.users = dict(users)
        self.progress = progress
        # the helpers below look as a user of their own: the test's users did only what the test did
        self._inspector = (f"inspector-{secrets.token_hex(4)}", secrets.token_urlsafe(16))
        self.port = 0
        self.folder: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The Confluent-compatible API: what SCHEMA_REGISTRY_URL names."""
        return f"{self.base_url}/apis/ccompat/v7"

    @property
    def log_path(self) -> Path:
        assert self.folder is not None
        return self.folder / "registry.log"

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> SchemaRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = READY_TIMEOUT) -> SchemaRegistry:
        app = registry_app(self.progress)
        self.folder = Path(tempfile.mkdtemp(prefix="orderpipe-schema-registry-"))
        atexit.register(self.stop)
        try:
            for attempt in range(3):  # a free port may be taken by someone else before Java binds it
                self.port = free_port()
                self._spawn(app)
                if self._wait_ready(timeout, last_attempt=attempt == 2):
                    return self
        except BaseException:
            self._end_process()  # its folder stays: the error names its log
            atexit.unregister(self.stop)
            raise
        raise AssertionError("unreachable")

    def _spawn(self, app: Path) -> None:
        assert self.folder is not None
        config = self.folder / "config"  # Quarkus reads ./config/application.properties: no password in argv
        config.mkdir(exist_ok=True)
        users = {**self.users, self._inspector[0]: self._inspector[1]}
        config.joinpath("application.properties").write_text(
            f"quarkus.http.host=127.0.0.1\nquarkus.http.port={self.port}\n" + "".join(
                f"quarkus.security.users.embedded.users.{_properties_key(user)}={_properties_value(password)}\n"
                for user, password in users.items()), encoding="ascii")
        scratch = self.folder / "tmp"  # vert.x's cache and the JVM's scratch files go away with the folder
        scratch.mkdir(exist_ok=True)
        self.progress(f"starting Apicurio Registry {apicurio_version()} on {self.url} (log: {self.log_path})")
        self._log = open(self.log_path, "ab", buffering=0)
        self._proc = subprocess.Popen(
            ["java", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData",
             f"-Djava.io.tmpdir={scratch}", "-jar", str(app / "quarkus-run.jar")],
            cwd=self.folder, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent, start_new_session=True)  # its own process group, killed whole

    def _log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self, timeout: float, last_attempt: bool) -> bool:
        """True once the Confluent API answers the inspector's login with 200; False when Java
        exited because the port was taken (start again elsewhere)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(auth=self._inspector, timeout=2) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    tail = self._log_tail()
                    self._end_process()
                    if not last_attempt and re.search(r"Port already bound|Address already in use", tail):
                        return False
                    raise SchemaRegistryUnavailable(
                        f"Apicurio Registry exited with code {code} while starting on {self.base_url}; "
                        f"{self.log_path} ends with:\n{tail}")
                try:
                    if client.get(f"{self.url}/subjects").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    tail = self._log_tail()
                    self._end_process()
                    raise SchemaRegistryUnavailable(
                        f"Apicurio Registry did not get ready on {self.base_url} within {timeout:g} s; "
                        f"{self.log_path} ends with:\n{tail}")
                time.sleep(0.1)

    def _end_process(self) -> None:
        """SIGTERM to the process group (Quarkus shuts down in well under a second), SIGKILL to
        the whole group past STOP_TIMEOUT or once Java has gone (anything it started goes too)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(STOP_TIMEOUT)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Idempotent: the registry and its temporary folder (log included) are gone after it
        (a registry that did not start keeps its folder: the error names its log)."""
        self._end_process()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        atexit.unregister(self.stop)

    # -- what the registry holds, as its own API shows it --------------------------------------

    def _get(self, path: str) -> object:
        with httpx.Client(auth=self._inspector, timeout=10) as client:
            response = client.get(f"{self.base_url}{path}")
            response.raise_for_status()
            return response.json()

    def subjects(self) -> dict[str, list[int]]:
        """subject -> the schema ids of its versions, in version order (Confluent API)."""
        found = {}
        for subject in self._get("/apis/ccompat/v7/subjects"):
            versions = self._get(f"/apis/ccompat/v7/subjects/{quote(subject, safe='')}/versions")
            found[subject] = [self._get(f"/apis/ccompat/v7/subjects/{quote(subject, safe='')}/versions/{v}")["id"]
                              for v in sorted(versions)]
        return found

    def created_by(self, subject: str) -> list[str]:
        """The user who registered each version of `subject`, in version order: Apicurio's
        `createdBy`, the name of the login that made the request."""
        listed = self._get(f"/apis/registry/v2/groups/default/artifacts/{quote(subject, safe='')}/versions")
        return [v["createdBy"] for v in sorted(listed["versions"], key=lambda v: int(v["version"]))]

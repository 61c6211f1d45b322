"""A Schema Registry on loopback that requires HTTP basic auth, for the tests of our client's
login (`SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`).

No Confluent-compatible registry can run on the project machine (Confluent's is not on Maven
Central, Karapace is not on PyPI, Apicurio 3 needs Java 21 and its basic auth needs an OIDC
server), so this speaks the part of the Confluent REST API the codec uses (register a schema
under a subject, fetch one by id, list subjects) with the same status codes, error bodies and
id rules: one id per distinct schema, the same schema registered again keeps its id. Every
request's user is recorded, so a test sees who registered and fetched what.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JSON = "application/vnd.schemaregistry.v1+json"


class SchemaRegistry:
    """`with SchemaRegistry({"user": "password"}) as registry:` serves on `registry.url`."""

    def __init__(self, users: dict[str, str]):
        self.users = users
        self.schemas: dict[int, str] = {}            # id -> schema text
        self.subjects: dict[str, list[int]] = {}     # subject -> ids of its versions, in order
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, user or None if refused)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> SchemaRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def users_who(self, method: str, path_pattern: str) -> set[str | None]:
        with self._lock:
            return {user for m, path, user in self.requests if m == method and re.fullmatch(path_pattern, path)}

    def _login(self, header: str | None) -> str | None:
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        return user if self.users.get(user) == password else None

    def _register(self, subject: str, schema: str) -> int:
        with self._lock:
            canonical = json.dumps(json.loads(schema), sort_keys=True)
            found = next((i for i, s in self.schemas.items() if s == canonical), None)
            schema_id = found if found is not None else len(self.schemas) + 1
            self.schemas[schema_id] = canonical
            versions = self.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def _handler(self):
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", JSON)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                path = self.path.split("?", 1)[0]
                user = registry._login(self.headers.get("Authorization"))
                with registry._lock:
                    registry.requests.append((method, path, user))
                if user is None:
                    self._answer(401, {"error_code": 401, "message": "Unauthorized"})
                    return
                if method == "GET" and path == "/subjects":
                    with registry._lock:
                        self._answer(200, sorted(registry.subjects))
                elif method == "GET" and (m := re.fullmatch(r"/schemas/ids/(\d+)", path)):
                    with registry._lock:
                        schema = registry.schemas.get(int(m[1]))
                    if schema is None:
                        self._answer(404, {"error_code": 40403, "message": "Schema not found"})
                    else:
                        self._answer(200, {"schema": schema})
                elif method == "POST" and (m := re.fullmatch(r"/subjects/([^/]+)/versions", path)):
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    self._answer(200, {"id": registry._register(m[1], body["schema"])})
                else:
                    self._answer(404, {"error_code": 404, "message": f"{method} {path} is not served here"})

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def log_message(self, *args: object) -> None:
                pass

        return Handler

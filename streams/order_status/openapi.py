"""The OpenAPI document of the order-status worker's HTTP pages (web.py), served at
/openapi.json: what each page answers, so clients (and the schemathesis test) can hold it to that.
The status itself is described by its model (status.OrderStatus), so the two cannot drift."""

from __future__ import annotations

from typing import Any

from streams.order_status.status import ORDER_STATES, OrderStatus

REF = "#/components/schemas/{model}"


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def openapi_document(version: str = "1") -> dict[str, Any]:
    status_schema = OrderStatus.model_json_schema(ref_template=REF)
    schemas: dict[str, Any] = status_schema.pop("$defs", {})
    schemas["OrderStatus"] = status_schema
    schemas["Problem"] = {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}
    schemas["Unavailable"] = {"type": "object", "description": "Faust's answer while the worker cannot answer "
                                                                "(starting, rebalancing, the assignment moved)."}
    schemas["Listing"] = {
        "type": "object", "required": ["scope", "count", "statuses"],
        "properties": {
            "scope": {"type": "string", "enum": ["cluster", "local"]},
            "count": {"type": "integer", "minimum": 0, "description": "matching orders (before the limit)"},
            "statuses": {"type": "array", "items": _ref("OrderStatus"), "description": "newest change first"},
            "workers": {"type": "array", "items": {"type": "string"}, "description": "cluster scope: who answered"},
            "worker": {"type": "string", "description": "local scope: this worker"},
            "partitions": {"type": "array", "items": {"type": "integer"}, "description": "local scope: its partitions"},
        }}
    schemas["Readiness"] = {
        "type": "object", "required": ["ready", "reason", "worker", "store", "partitions", "uptime_s"],
        "properties": {
            "ready": {"type": "boolean"}, "reason": {"type": ["string", "null"]}, "worker": {"type": "string"},
            "store": {"type": "string"}, "partitions": {"type": "array", "items": {"type": "integer"}},
            "uptime_s": {"type": "number"}, "orders": {"type": "integer", "description": "with ?count=1"},
        }}
    unavailable = _json(_ref("Unavailable"), "The worker cannot answer now (starting or rebalancing); ask again.")
    return {
        "openapi": "3.1.0",
        "info": {"title": "orderpipe order-status worker", "version": version,
                 "description": "The order-status view: one order's status, lists by state and time."},
        "paths": {
            "/status/{order_id}/": {"get": {
                "summary": "One order's status, from whichever worker owns it",
                "parameters": [{"name": "order_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(_ref("OrderStatus"), "The order's status."),
                              "404": _json(_ref("Problem"), "The view has not seen this order."),
                              "503": unavailable}}},
            "/status/": {"get": {
                "summary": "Statuses by state and last change, newest first, from every worker",
                "parameters": [
                    {"name": "state", "in": "query", "schema": {"type": "string"},
                     "description": f"comma-separated, of {', '.join(ORDER_STATES)}"},
                    {"name": "since", "in": "query", "schema": {"type": "string"},
                     "description": "changed since: a duration (1h, 30m, 2d) or an ISO 8601 time"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 1000}},
                    {"name": "scope", "in": "query", "schema": {"type": "string", "enum": ["cluster", "local"]}},
                ],
                "responses": {"200": _json(_ref("Listing"), "The matching statuses."),
                              "400": _json(_ref("Problem"), "A parameter the view cannot read."),
                              "503": unavailable}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json(
                {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}, "Alive.")}}},
            "/ready": {"get": {
                "summary": "Readiness: assigned and restored",
                "parameters": [{"name": "count", "in": "query", "schema": {"type": "string"},
                                "description": "non-empty: also count this worker's orders"}],
                "responses": {"200": _json(_ref("Readiness"), "Ready."),
                              "503": _json(_ref("Readiness"), "Not ready; `reason` says why.")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": schemas},
    }

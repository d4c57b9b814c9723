"""OpenAPI 3.1 document generated from the routes and the msgspec Structs they speak.

Every HTTP endpoint is declared with :func:`endpoint`, which records what it takes and returns;
:func:`document` walks the app's routes and builds the spec. A route without a declaration is
an error, so the spec cannot silently fall behind the code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from bilten.errors import CODES, ErrorBody

F = TypeVar("F", bound=Callable[..., Any])

_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    body: type | None = None
    response: type | None = None
    status: int = 200
    content_type: str = "application/json"
    query: Sequence[tuple[str, str, str]] = ()  # (name, JSON Schema type, description)
    errors: Sequence[str] = ()
    auth: bool = False
    description: str = ""
    extra_responses: dict[int, str] = field(default_factory=dict)


def endpoint(**kwargs: Any) -> Callable[[F], F]:
    """Declare an endpoint for the OpenAPI document (see :class:`Operation` for the fields)."""
    operation = Operation(**kwargs)

    def mark(fn: F) -> F:
        fn.__openapi__ = operation  # type: ignore[attr-defined]
        return fn

    return mark


class UndocumentedRoute(RuntimeError):
    pass


def _walk(routes: Sequence[BaseRoute], prefix: str = "") -> list[tuple[str, BaseRoute]]:
    found: list[tuple[str, BaseRoute]] = []
    for route in routes:
        if isinstance(route, Mount):
            found += _walk(route.routes, prefix + route.path)
        else:
            found.append((prefix + getattr(route, "path", ""), route))
    return found


def _json_schema_type(t: type | None) -> dict[str, Any]:
    return {} if t is None else {"$ref": f"#/components/schemas/{t.__name__}"}


def document(
    routes: Sequence[BaseRoute],
    *,
    title: str,
    version: str,
    examples: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``examples``: a request body to show for each body type, by the type's name."""
    paths: dict[str, dict[str, Any]] = {}
    types: set[type] = {ErrorBody}
    for path, route in _walk(routes):
        if isinstance(route, Route):
            if not route.include_in_schema:  # the web app's page and files
                continue
            methods = sorted(m.lower() for m in (route.methods or ()) if m != "HEAD")
        elif isinstance(route, WebSocketRoute):
            methods = ["get"]
        else:
            continue
        operation: Operation | None = getattr(route.endpoint, "__openapi__", None)
        if operation is None:
            raise UndocumentedRoute(f"route {path} has no @endpoint declaration")
        template = _PARAM.sub(r"{\1}", path)
        for method in methods:
            paths.setdefault(template, {})[method] = _operation(
                operation, template, method, types, examples or {}
            )
    schemas = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )[1]
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def _operation(
    op: Operation, template: str, method: str, types: set[type], examples: Mapping[str, Any]
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAM.findall(template)
    ]
    params += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": kind},
            "description": text,
        }
        for name, kind, text in op.query
    ]
    success: dict[str, Any] = {"description": "Success."}
    if op.response is not None:
        types.add(op.response)
        success["content"] = {op.content_type: {"schema": _json_schema_type(op.response)}}
    elif op.content_type != "application/json":
        success["content"] = {op.content_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(op.status): success}
    for status, text in op.extra_responses.items():
        responses[str(status)] = {"description": text}
    error_schema = {"application/json": {"schema": _json_schema_type(ErrorBody)}}
    codes = list(op.errors)
    if op.body is not None:
        codes += ["bad_request", "validation_error", "payload_too_large"]
    if op.auth:
        codes += ["unauthorized"]
    for code in codes:
        entry = responses.setdefault(str(CODES[code]), {"description": "", "content": error_schema})
        entry["description"] = ", ".join(filter(None, [entry["description"], code]))
    result: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": f"{method}_{template}".replace("/", "_").replace("{", "").replace("}", ""),
        "responses": responses,
    }
    if op.description:
        result["description"] = op.description
    if params:
        result["parameters"] = params
    if op.body is not None:
        types.add(op.body)
        media: dict[str, Any] = {"schema": _json_schema_type(op.body)}
        if op.body.__name__ in examples:
            media["example"] = examples[op.body.__name__]
        result["requestBody"] = {"required": True, "content": {"application/json": media}}
    if op.auth:
        result["security"] = [{"bearer": []}]
    return result

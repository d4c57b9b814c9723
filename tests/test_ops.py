"""Health, readiness, metrics and the OpenAPI document."""

import re
from datetime import UTC, datetime

import msgspec
import pytest
from asgi_lifespan import LifespanManager
from httpx import ASGITransport, AsyncClient
from starlette.routing import Route

from bilten import docs_ui, openapi
from bilten.app import create_app
from bilten.openapi import UndocumentedRoute
from bilten.settings import Settings


async def test_health(client):
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_when_postgres_and_redis_answer(client):
    response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "postgres": "ok", "redis": "ok"}


async def test_not_ready_when_redis_is_down(settings):
    broken = settings.replace(redis_url="redis://127.0.0.1:1/0", ready_timeout=0.5)
    async with LifespanManager(create_app(broken)) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
        ) as c:
            response = await c.get("/health/ready")
            assert (await c.get("/health")).status_code == 200
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "unavailable"
    assert error["details"] == {"postgres": "ok", "redis": "unavailable"}


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_requests_by_route_template_not_raw_path(client):
    before = sample(
        (await client.get("/metrics")).text,
        "bilten_http_requests_total",
        route="/health",
        status="200",
    )
    for _ in range(3):
        await client.get("/health")
    await client.get("/events/3f1c0d7e-secret-path")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    after = sample(text, "bilten_http_requests_total", route="/health", status="200")
    assert after - before == 3
    assert sample(text, "bilten_http_requests_total", route="<unmatched>", status="404") >= 1
    assert "3f1c0d7e" not in text
    assert "bilten_http_request_duration_seconds_bucket" in text
    assert "bilten_http_requests_in_flight" in text
    assert "process_cpu_seconds_total" in text or "python_info" in text


async def test_openapi_describes_every_route(client):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["openapi"].startswith("3.1")
    app_routes = create_app_routes()
    assert app_routes, "the app has routes"
    for path, methods in app_routes.items():
        assert path in spec["paths"], f"{path} missing from /openapi.json"
        for method in methods:
            assert method in spec["paths"][path], f"{method} {path} missing from /openapi.json"
    # Every referenced schema exists.
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', response.text))
    assert refs <= set(spec["components"]["schemas"])
    assert "ErrorBody" in spec["components"]["schemas"]


def create_app_routes():
    app = create_app(Settings())
    found = {}
    for route in app.routes:
        if isinstance(route, Route) and route.include_in_schema:  # not the pages' files
            methods = {m.lower() for m in route.methods or ()} - {"head"}
            found[re.sub(r"{([^}:]+)(:[^}]+)?}", r"{\1}", route.path)] = methods
    return found


def test_a_route_without_a_declaration_fails_the_document():
    async def bare(request):  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(UndocumentedRoute):
        openapi.document([Route("/bare", bare)], title="t", version="0")


def test_path_parameters_and_bodies_are_described():
    from bilten.wire import Struct

    class Thing(Struct):
        name: str

    @openapi.endpoint(
        summary="Make a thing.",
        tag="t",
        body=Thing,
        response=Thing,
        status=201,
        errors=("conflict",),
    )
    async def make(request):  # pragma: no cover - never called
        raise AssertionError

    spec = openapi.document(
        [Route("/things/{thing_id:str}", make, methods=["POST"])], title="t", version="0"
    )
    operation = spec["paths"]["/things/{thing_id}"]["post"]
    assert operation["parameters"][0]["name"] == "thing_id"
    assert set(operation["responses"]) == {"201", "409", "400", "422", "413"}
    assert spec["components"]["schemas"]["Thing"]["required"] == ["name"]


async def test_docs_page_and_its_files_come_from_here_under_a_strict_policy(client):
    page = await client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "style-src 'self';" in policy
    assert "unsafe" not in policy and "http" not in policy and "*" not in policy
    assert "/openapi.json" in page.text
    assert not re.search(r"<script>|<style|\sstyle=", page.text), "inline script or style"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)
    assets = re.findall(r"""(?:src|href)="(/docs/assets/[^"]+)\"""", page.text)
    names = {path.rsplit("/", 1)[1] for path in assets}
    assert names >= {"swagger-ui-bundle.js", "swagger-ui.css", "docs.js", "docs.css"}
    for path in assets:
        assert path.startswith(docs_ui.PREFIX + "/")
        asset = await client.get(path)
        assert asset.status_code == 200, path
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert asset.headers["content-security-policy"] == policy
        assert asset.content == docs_ui.FILES[path.rsplit("/", 1)[1]][0]
    # Another release's page (a rolling restart) gets this one's files, not kept.
    other = await client.get("/docs/assets/0123456789abcdef/docs.js")
    assert other.status_code == 200 and other.headers["cache-control"] == "no-cache"
    assert (await client.get(f"{docs_ui.PREFIX}/nothing.js")).status_code == 404


async def test_every_request_body_has_an_example_of_its_type(client):
    bodies = {}
    for route in create_app(Settings()).routes:
        operation = getattr(getattr(route, "endpoint", None), "__openapi__", None)
        if operation is not None and operation.body is not None:
            bodies[operation.body.__name__] = operation.body
    spec = (await client.get("/openapi.json")).json()
    shown = set()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if "requestBody" in operation:
                media = operation["requestBody"]["content"]["application/json"]
                assert "example" in media, f"{method.upper()} {path} has no example"
                name = media["schema"]["$ref"].rsplit("/", 1)[1]
                msgspec.convert(media["example"], bodies[name])  # raises when it does not fit
                shown.add(name)
    assert shown == set(bodies)
    event = spec["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]
    assert event["example"]["starts_at"] > datetime.now(UTC).isoformat()

"""The error shape, request ids, body decoding, and what every response carries."""

import json
import logging

import msgspec
import pytest
from asgi_lifespan import LifespanManager
from httpx import ASGITransport, AsyncClient
from starlette.requests import Request
from starlette.routing import Route

from bilten import logs, openapi
from bilten.app import create_app
from bilten.wire import JSONResponse, Struct, read_json


class Seat(Struct, kw_only=True):
    row: str
    number: int


class Order(Struct, kw_only=True):
    event_id: str
    seats: list[Seat]
    note: str | None = None


log = logging.getLogger("tests.echo")


@openapi.endpoint(summary="Echo an order.", tag="test", body=Order, response=Order)
async def echo(request: Request):
    order = await read_json(request, Order)
    log.info("echoing an order")
    return JSONResponse(order)


@openapi.endpoint(summary="Always fails.", tag="test")
async def boom(request: Request):
    raise RuntimeError("secret internals")


@pytest.fixture
async def app_client(settings):
    app = create_app(settings)
    app.router.routes += [
        Route("/_test/echo", echo, methods=["POST"]),
        Route("/_test/boom", boom, methods=["GET"]),
    ]
    async with LifespanManager(app) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app, raise_app_exceptions=False),
            base_url="http://bilten.test",
        ) as c:
            yield c


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


async def test_unknown_route_is_a_404_in_the_error_shape(client):
    response = await client.get("/no/such/thing")
    assert_error(response, 404, "not_found")
    assert len(response.headers["x-request-id"]) == 32


async def test_wrong_method_is_a_405_in_the_error_shape(client):
    response = await client.delete("/health")
    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}


async def test_request_id_is_echoed_when_given_and_replaced_when_unsafe(client):
    response = await client.get("/health", headers={"X-Request-Id": "trace-123.abc"})
    assert response.headers["x-request-id"] == "trace-123.abc"
    response = await client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert response.headers["x-request-id"] != "bad id\twith spaces"
    assert len(response.headers["x-request-id"]) == 32
    first = (await client.get("/health")).headers["x-request-id"]
    second = (await client.get("/health")).headers["x-request-id"]
    assert first != second


async def test_valid_body_is_decoded_into_structs(app_client):
    body = {"event_id": "e1", "seats": [{"row": "A", "number": 3}]}
    response = await app_client.post("/_test/echo", json=body)
    assert response.status_code == 200
    assert response.json() == {**body, "note": None}


async def test_malformed_json_is_a_400(app_client):
    response = await app_client.post(
        "/_test/echo", content=b'{"event_id": "e1", ', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "bad_request")


async def test_wrong_content_type_is_a_400(app_client):
    response = await app_client.post("/_test/echo", data={"event_id": "e1"})
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"event_id": "e1", "seats": [{"row": "A", "number": "three"}]}, "seats[0].number"),
        ({"seats": []}, None),  # a missing field is named in the message
        ({"event_id": "e1", "seats": [], "price": 1}, "price"),
        ({"event_id": "e1", "seats": [{"row": "A", "number": 1, "x": 0}]}, "seats[0].x"),
        ({"event_id": 7, "seats": []}, "event_id"),
    ],
)
async def test_failing_field_is_a_422_naming_it(app_client, body, field):
    error = assert_error(await app_client.post("/_test/echo", json=body), 422, "validation_error")
    reported = error["details"]["fields"][0]
    if field:
        assert reported["field"] == field
        assert field in error["message"]
    else:
        assert any(name in error["message"] for name in ("event_id", "price"))


async def test_json_body_over_one_megabyte_is_a_413(app_client):
    big = json.dumps({"event_id": "x" * (1024 * 1024), "seats": []})
    response = await app_client.post(
        "/_test/echo", content=big, headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")


async def test_streamed_body_over_the_limit_is_a_413_without_content_length(app_client):
    async def chunks():
        for _ in range(20):
            yield b"x" * 65536

    response = await app_client.post(
        "/_test/echo", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")


async def test_unexpected_error_is_a_500_with_request_id_and_no_traceback(app_client, caplog):
    response = await app_client.get("/_test/boom", headers={"X-Request-Id": "req-500"})
    error = assert_error(response, 500, "internal_error")
    assert error["details"] == {"request_id": "req-500"}
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"] == "req-500"
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged and logged[-1].exc_info is not None
    assert "secret internals" in str(logged[-1].exc_info[1])


async def test_a_client_gone_mid_body_is_no_server_error(settings, caplog):
    """Counted as 499 (the client closed the request), not logged as a failure nor a 500."""
    from bilten import metrics

    app = create_app(settings)
    app.router.routes += [Route("/_test/echo", echo, methods=["POST"])]
    messages = [
        {"type": "http.request", "body": b'{"event_id": "e", ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/_test/echo",
        "raw_path": b"/_test/echo",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "scheme": "http",
        "server": ("bilten.test", 80),
        "client": ("127.0.0.1", 5000),
        "root_path": "",
    }
    before = metrics.HTTP.answered.get(("POST", "/_test/echo", 499), 0)
    async with LifespanManager(app) as manager:
        await manager.app(scope, receive, send)
    assert sent == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert metrics.HTTP.answered.get(("POST", "/_test/echo", 499), 0) == before + 1


async def test_every_log_line_carries_the_request_id(app_client, caplog):
    caplog.set_level(logging.INFO)
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    handler.addFilter(logs._RequestIdFilter())
    handler.setFormatter(logs.JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        await app_client.post(
            "/_test/echo",
            json={"event_id": "e", "seats": []},
            headers={"X-Request-Id": "req-log-1"},
        )
    finally:
        logging.getLogger().removeHandler(handler)
    entries = [msgspec.json.decode(line) for line in lines]
    echo_lines = [e for e in entries if e["msg"] == "echoing an order"]
    assert echo_lines and echo_lines[0]["request_id"] == "req-log-1"
    assert echo_lines[0]["level"] == "info"
    assert echo_lines[0]["ts"].endswith("Z")


async def test_every_answer_carries_security_headers(client):
    for path in ("/health", "/events", "/no-such-page"):
        response = await client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert "strict-transport-security" not in (await client.get("/health")).headers


async def test_the_docs_page_may_run_only_its_own_script(client):
    page = await client.get("/docs")
    policy = page.headers["content-security-policy"]
    assert "'unsafe-inline'" not in policy
    assert "script-src 'self';" in policy
    assert b"<script>" not in page.content


async def test_https_sites_send_hsts(settings):
    from tests.test_auth import app_client

    async with app_client(settings.replace(public_url="https://tickets.example.com")) as c:
        assert "max-age=" in (await c.get("/health")).headers["strict-transport-security"]


async def test_metrics_only_for_allowed_addresses_or_the_token(settings):
    from tests.test_auth import app_client

    guarded = settings.replace(metrics_token="scrape-token-0123456789")
    async with app_client(guarded, "203.0.113.5") as (local, remote):
        assert (await local.get("/metrics")).status_code == 200
        refused = await remote.get("/metrics")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        wrong = await remote.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        right = await remote.get(
            "/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"}
        )
        assert right.status_code == 200 and b"bilten_" in right.content


async def test_cors_is_off_unless_origins_are_named(settings):
    from tests.test_auth import app_client

    preflight = {
        "Origin": "https://tickets.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with app_client(settings) as c:
        closed = await c.options("/bookings", headers=preflight)
        assert "access-control-allow-origin" not in closed.headers
    named = settings.replace(cors_origins=("https://tickets.example.com",))
    async with app_client(named) as c:
        opened = await c.options("/bookings", headers=preflight)
        assert opened.status_code == 200
        assert opened.headers["access-control-allow-origin"] == "https://tickets.example.com"
        other = await c.options(
            "/bookings", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers
        assert "access-control-allow-credentials" not in opened.headers


async def test_routes_filed_by_first_segment_answer_as_starlette_does():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse

    from bilten import errors
    from bilten.middleware import App

    def endpoint(name):
        async def answer(request):
            return PlainTextResponse(f"{name} {dict(request.path_params)}")

        return answer

    table = [
        Route("/a", endpoint("post a"), methods=["POST"]),
        Route("/{x}/b", endpoint("any b")),  # a first segment that is not fixed: tried for all
        Route("/a/b", endpoint("a b")),
        Route("/a/{n:int}", endpoint("a n")),
        Route("/c/", endpoint("c slash")),
        Route("/", endpoint("root")),
    ]
    plain = Starlette(routes=table, exception_handlers=errors.HANDLERS)
    filed = App(routes=table, lifespan=None, exception_handlers=errors.HANDLERS)
    asked = [
        ("GET", p)
        for p in ("/", "/a", "/a/b", "/z/b", "/a/7", "/a/x", "/c", "/c/", "/nowhere", "/a/")
    ] + [("POST", "/a"), ("DELETE", "/a/b"), ("POST", "/")]

    async def answers(app):
        found = []
        async with AsyncClient(transport=ASGITransport(app=app), base_url="http://t") as c:
            for method, path in asked:
                answer = await c.request(method, path)
                found.append((answer.status_code, answer.headers.get("location"), answer.text))
        return found

    served = await answers(filed)
    assert served == await answers(plain)
    assert served[2][2] == "any b {'x': 'a'}"  # the earlier route wins, as in Starlette
    assert {status for status, _, _ in served} == {200, 307, 404, 405}

    # Routes added once the app serves are filed too.
    filed.router.routes.append(Route("/late", endpoint("late")))
    async with AsyncClient(transport=ASGITransport(app=filed), base_url="http://t") as c:
        assert (await c.get("/late")).text == "late {}"


def _request(headers: list[tuple[bytes, bytes]], messages: list[dict]) -> Request:
    async def receive() -> dict:
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


def test_a_header_is_its_first_value_whatever_the_case_of_its_name():
    from bilten.wire import header

    request = _request(
        [
            (b"Authorization", b"Bearer first"),
            (b"authorization", b"Bearer second"),
            (b"x", b"\xe9"),
        ],
        [],
    )
    assert header(request, b"authorization") == "Bearer first"
    assert header(request, b"x") == "\xe9"  # latin-1, as Starlette reads headers
    assert header(request, b"prefer") is None


async def test_a_body_in_pieces_is_read_whole_and_kept_for_starlette():
    from bilten.wire import read_body

    pieces = [{"type": "http.request", "body": b"ab", "more_body": True}]
    pieces += [{"type": "http.request", "body": b"", "more_body": True}]
    pieces += [{"type": "http.request", "body": b"cd"}]
    request = _request([], pieces)
    assert await read_body(request, 10) == b"abcd"
    assert await request.body() == b"abcd"


async def test_a_body_past_its_limit_is_refused_before_the_rest_is_read():
    from starlette.requests import ClientDisconnect

    from bilten.errors import ApiError
    from bilten.wire import read_body

    pieces = [{"type": "http.request", "body": b"x" * 6, "more_body": True}] * 3
    request = _request([], list(pieces))
    with pytest.raises(ApiError) as refused:
        await read_body(request, 10)
    assert refused.value.code == "payload_too_large"
    left = [{"type": "http.request", "body": b"x", "more_body": True}, {"type": "http.disconnect"}]
    with pytest.raises(ClientDisconnect):
        await read_body(_request([], left), 10)
    declared = _request([(b"content-length", b"11")], [])
    with pytest.raises(ApiError):
        await read_body(declared, 10)


@pytest.mark.parametrize(
    ("declared", "code"),
    [
        (b"0" * 5000 + b"11", "payload_too_large"),  # int() of so many digits would fail
        (b"9" * 5000, "payload_too_large"),
        (b"\xd9\xa1\xd9\xa1", "bad_request"),  # Arabic-Indic digits: isdigit(), not ASCII
        (b"-1", "bad_request"),
    ],
)
async def test_an_odd_content_length_is_a_clear_error(declared, code):
    from bilten.errors import ApiError
    from bilten.wire import read_body

    with pytest.raises(ApiError) as refused:
        await read_body(_request([(b"content-length", declared)], []), 10)
    assert refused.value.code == code


async def test_a_content_length_with_leading_zeros_within_the_limit_is_read():
    from bilten.wire import read_body

    request = _request(
        [(b"content-length", b"0" * 5000 + b"4")], [{"type": "http.request", "body": b"abcd"}]
    )
    assert await read_body(request, 10) == b"abcd"


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([], 7.0),
        ([(b"prefer", b"wait=10")], 10.0),
        ([(b"prefer", b"respond-async"), (b"prefer", b"wait=10")], 10.0),  # several headers
        ([(b"Prefer", b"respond-async, WAIT = 2.5")], 2.5),  # any case, spaces around "="
        ([(b"prefer", b'wait="4"')], 4.0),
        ([(b"prefer", b"wait=999")], 30.0),  # capped
        ([(b"prefer", b"wait=0")], 0.0),
        ([(b"prefer", b"wait=-1")], 7.0),  # not a wait: the default
        ([(b"prefer", b"wait=" + b"9" * 5000)], 7.0),
        ([(b"prefer", b"wait=\xd9\xa1")], 7.0),  # a digit, but not an ASCII one
        ([(b"prefer", b"wait=1x")], 7.0),
        ([(b"prefer", b"nowait=5")], 7.0),
    ],
)
def test_prefer_wait_is_read_as_rfc_7240_allows(headers, seconds):
    from bilten.routes.bookings import _wait_seconds

    assert _wait_seconds(_request(headers, []), 7.0) == seconds


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (b"k-1", "k-1"),
        (b" \tk 1\t ", "k 1"),  # spaces and tabs around it go, inside it stay
        (b"\xa0k\xa0", "\xa0k\xa0"),  # other characters are the client's: compared as sent
        (b"a\x00b", None),
        (b"a\x1fb", None),
        (b"a\x7f", None),
        (b"  ", None),
        (b"x" * 201, None),
    ],
)
def test_an_idempotency_key_has_no_control_characters(value, key):
    from bilten.errors import ApiError
    from bilten.routes.bookings import _idempotency_key

    request = _request([(b"idempotency-key", value)], [])
    if key is not None:
        assert _idempotency_key(request) == key
        return
    with pytest.raises(ApiError) as refused:
        _idempotency_key(request)
    assert refused.value.code == "validation_error"

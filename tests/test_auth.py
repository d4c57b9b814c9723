"""Authentication over HTTP: registration, login, tokens, rotation, forgery, rate limits."""

import asyncio
import base64
import contextlib
import json
import time

import jwt
import pytest

from bilten import passwords
from bilten.settings import Rate
from bilten.tokens import AUDIENCE, ISSUER, key_id
from tests.conftest import TEST_SECRET, truncate

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
async def no_users(database_url):
    await truncate(database_url, "users")


async def register(client, email="ann@example.com", password=PASSWORD, name="Ann", **extra):
    return await client.post(
        "/auth/register", json={"email": email, "password": password, "name": name, **extra}
    )


async def login(client, email="ann@example.com", password=PASSWORD):
    return await client.post("/auth/login", json={"email": email, "password": password})


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


async def test_register_signs_in_and_me_answers(client):
    response = await register(client, email="  Ann@Example.COM ", role="organizer")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert body["user"]["email"] == "ann@example.com"
    assert body["user"]["role"] == "organizer"
    assert body["user"]["email_verified"] is False
    assert len(body["refresh_token"]) >= 43  # 256 bits, URL-safe base64
    me = await client.get("/auth/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json() == body["user"]
    assert set(me.json()) == {"id", "email", "name", "role", "email_verified"}


async def test_access_token_claims(client):
    body = (await register(client)).json()
    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert header["kid"] == key_id(TEST_SECRET)
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["sub"] == body["user"]["id"]
    assert claims["role"] == "attendee"
    assert claims["iss"] == ISSUER
    assert claims["exp"] - claims["iat"] == 900
    assert claims["jti"]


async def test_duplicate_email_is_a_409_whatever_its_case(client):
    assert (await register(client)).status_code == 201
    response = await register(client, email="ANN@example.com")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "email_taken"


async def test_concurrent_registrations_of_one_email_make_one_account(client):
    responses = await asyncio.gather(
        *(register(client, email="race@example.com") for _ in range(5))
    )
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409, 409]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email", "password": PASSWORD, "name": "A"}, "email"),
        ({"email": "a@example.com", "password": "short", "name": "A"}, "password"),
        ({"email": "a@example.com", "password": "x" * 257, "name": "A"}, "password"),
        ({"email": "a@example.com", "password": PASSWORD, "name": ""}, "name"),
        ({"email": "a@example.com", "password": PASSWORD, "name": "   "}, "name"),
        ({"email": "a@example.com", "password": PASSWORD, "name": "Ann\nClick here"}, "name"),
        ({"email": "a@example.com", "password": PASSWORD, "name": "Ann\u202egpj.exe"}, "name"),
        ({"email": "a@example.com", "password": PASSWORD, "name": "A", "role": "admin"}, "role"),
        ({"email": "a@example.com", "password": PASSWORD}, None),
    ],
)
async def test_invalid_registration_is_a_422_naming_the_field(client, body, field):
    response = await client.post("/auth/register", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    if field:
        assert error["details"]["fields"][0]["field"] == field
    else:
        assert "name" in error["message"]


async def test_login_and_wrong_password_and_unknown_email(client):
    await register(client)
    ok = await login(client, email="ANN@example.com")
    assert ok.status_code == 200
    assert ok.json()["user"]["email"] == "ann@example.com"
    wrong = await login(client, password="wrong password!")
    unknown = await login(client, email="nobody@example.com")
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_credentials"
    assert wrong.json()["error"]["message"] == unknown.json()["error"]["message"]


async def test_unknown_email_costs_as_much_as_a_wrong_password(settings):
    hasher = passwords.from_settings(settings.replace(argon2_memory_kib=16 * 1024))
    stored = await hasher.hash(PASSWORD)

    async def timed(password_hash):
        began = time.perf_counter()
        for _ in range(5):
            assert not await hasher.verify(password_hash, "wrong password!")
        return time.perf_counter() - began

    known, unknown = await timed(stored), await timed(None)
    assert 0.5 < unknown / known < 2


async def test_refresh_rotates_and_reuse_revokes_the_family(client):
    first = (await register(client)).json()["refresh_token"]
    response = await client.post("/auth/refresh", json={"refresh_token": first})
    assert response.status_code == 200
    second = response.json()["refresh_token"]
    assert second != first
    assert (
        await client.get("/auth/me", headers=bearer(response.json()["access_token"]))
    ).status_code == 200
    # The spent token comes back: someone copied it. The whole family dies, the live one too.
    reuse = await client.post("/auth/refresh", json={"refresh_token": first})
    assert reuse.status_code == 401
    assert reuse.json()["error"]["code"] == "unauthorized"
    after = await client.post("/auth/refresh", json={"refresh_token": second})
    assert after.status_code == 401


async def test_concurrent_refreshes_of_one_token_yield_one_winner_at_most(client):
    token = (await register(client)).json()["refresh_token"]
    responses = await asyncio.gather(
        *(client.post("/auth/refresh", json={"refresh_token": token}) for _ in range(4))
    )
    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) <= 1
    # The reuse among them revoked the family: even the winner's token is dead.
    for winner in winners:
        again = await client.post(
            "/auth/refresh", json={"refresh_token": winner.json()["refresh_token"]}
        )
        assert again.status_code == 401


async def test_logout_revokes_the_family(client):
    session = (await register(client)).json()
    other = (await login(client)).json()
    response = await client.post("/auth/logout", json={"refresh_token": session["refresh_token"]})
    assert response.status_code == 204
    refused = await client.post("/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert refused.status_code == 401
    # Another device's session (another family) lives on.
    kept = await client.post("/auth/refresh", json={"refresh_token": other["refresh_token"]})
    assert kept.status_code == 200


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims_for(user_id, role="attendee", **changes):
    now = int(time.time())
    return {
        "sub": user_id,
        "role": role,
        "iat": now,
        "exp": now + 600,
        "jti": "x",
        "iss": ISSUER,
        "aud": AUDIENCE,
        **changes,
    }


async def test_forged_tokens_are_refused(client):
    session = (await register(client)).json()
    user_id = session["user"]["id"]
    token = session["access_token"]
    header, _payload, signature = token.split(".")
    tampered_payload = b64(claims_for(user_id, role="admin"))
    forged = {
        "tampered payload": f"{header}.{tampered_payload}.{signature}",
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': key_id(TEST_SECRET)})}."
        f"{b64(claims_for(user_id))}.",
        "refresh token as access token": session["refresh_token"],
        "expired": jwt.encode(
            claims_for(user_id, iat=int(time.time()) - 3600, exp=int(time.time()) - 60),
            TEST_SECRET,
            algorithm="HS256",
            headers={"kid": key_id(TEST_SECRET)},
        ),
        "other key": jwt.encode(
            claims_for(user_id),
            "another-secret-key-of-sufficient-length-000",
            algorithm="HS256",
            headers={"kid": key_id(TEST_SECRET)},
        ),
        "unknown kid": jwt.encode(
            claims_for(user_id), TEST_SECRET, algorithm="HS256", headers={"kid": "nope"}
        ),
        "wrong audience": jwt.encode(
            claims_for(user_id, aud="elsewhere"),
            TEST_SECRET,
            algorithm="HS256",
            headers={"kid": key_id(TEST_SECRET)},
        ),
        "HS512": jwt.encode(
            claims_for(user_id),
            TEST_SECRET,
            algorithm="HS512",
            headers={"kid": key_id(TEST_SECRET)},
        ),
        "garbage": "not.a.token",
    }
    for name, bad in forged.items():
        response = await client.get("/auth/me", headers=bearer(bad))
        assert response.status_code == 401, name
        assert response.json()["error"]["code"] == "unauthorized", name
    missing = await client.get("/auth/me")
    assert missing.status_code == 401
    basic = await client.get("/auth/me", headers={"Authorization": "Basic YTpi"})
    assert basic.status_code == 401


async def test_tokens_of_a_rotated_out_key_still_verify(settings, client):
    from asgi_lifespan import LifespanManager
    from httpx import ASGITransport, AsyncClient

    from bilten.app import create_app

    old_token = (await register(client)).json()["access_token"]
    rotated = settings.replace(
        secret_key="the-new-signing-key-0123456789abcdef-xyz", old_secret_keys=(TEST_SECRET,)
    )
    async with LifespanManager(create_app(rotated)) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
        ) as new:
            assert (await new.get("/auth/me", headers=bearer(old_token))).status_code == 200
            fresh = (await login(new)).json()["access_token"]
            assert jwt.get_unverified_header(fresh)["kid"] == key_id(rotated.secret_key)
    # An instance that never knew the new key refuses its tokens.
    assert (await client.get("/auth/me", headers=bearer(fresh))).status_code == 401


async def test_thirty_wrong_passwords_meet_a_429_early(client):
    await register(client)
    statuses = []
    for _ in range(30):
        response = await login(client, password="wrong password!")
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after = int(response.headers["retry-after"])
            assert 0 < retry_after <= 60
            assert response.json()["error"]["code"] == "rate_limited"
    assert 429 in statuses
    assert statuses.index(429) <= 5
    # Even the right password waits for the window now.
    assert (await login(client)).status_code == 429


async def test_parallel_guesses_cannot_pass_the_limit(client):
    await register(client, email="par@example.com")
    responses = await asyncio.gather(
        *(login(client, email="par@example.com", password=f"guess-number-{i}") for i in range(20))
    )
    statuses = [r.status_code for r in responses]
    assert statuses.count(401) == 5
    assert statuses.count(429) == 15


async def test_successful_logins_are_not_counted(client):
    await register(client, email="often@example.com")
    for _ in range(8):
        assert (await login(client, email="often@example.com")).status_code == 200


async def test_password_is_rehashed_when_parameters_change(settings, client):
    from asgi_lifespan import LifespanManager
    from httpx import ASGITransport, AsyncClient

    from bilten import db
    from bilten.app import create_app

    await register(client, email="rehash@example.com")

    async def stored():
        conn = await db.connect(settings.database_url)
        try:
            return await conn.fetchval(
                "SELECT password_hash FROM users WHERE email = 'rehash@example.com'"
            )
        finally:
            await conn.close()

    before = await stored()
    assert "t=1" in before
    stronger = settings.replace(argon2_time_cost=2)
    async with LifespanManager(create_app(stronger)) as manager:
        async with AsyncClient(
            transport=ASGITransport(app=manager.app), base_url="http://bilten.test"
        ) as c:
            assert (await login(c, email="rehash@example.com")).status_code == 200
    after = await stored()
    assert after != before and "t=2" in after
    assert (await login(client, email="rehash@example.com")).status_code == 200


@contextlib.asynccontextmanager
async def app_client(settings, *others):
    """A client of a new instance, and one more for each address in ``others`` (clients seen
    from those addresses)."""
    from asgi_lifespan import LifespanManager
    from httpx import ASGITransport, AsyncClient

    from bilten.app import create_app

    async with LifespanManager(create_app(settings)) as manager, contextlib.AsyncExitStack() as s:
        made = []
        for address in ("127.0.0.1", *others):
            transport = ASGITransport(app=manager.app, client=(address, 40000))
            made.append(
                await s.enter_async_context(
                    AsyncClient(transport=transport, base_url="http://bilten.test")
                )
            )
        yield made[0] if not others else made


async def test_a_stranger_guessing_cannot_lock_the_owner_out(settings):
    async with app_client(settings, "10.0.0.7", "10.0.0.66") as (_, owner, stranger):
        assert (await register(owner, email="own@example.com")).status_code == 201
        guesses = [
            (await login(stranger, email="own@example.com", password=f"guess-{n}-xxxx")).status_code
            for n in range(10)
        ]
        assert guesses == [401] * 5 + [429] * 5
        assert (await login(owner, email="own@example.com")).status_code == 200


async def test_the_per_email_ceiling_spares_addresses_the_owner_used(settings):
    tight = settings.replace(limit_login_email=Rate(6, 3600))
    strangers = [f"10.0.1.{n}" for n in range(4)]
    async with app_client(tight, "10.0.0.7", "10.0.0.8", *strangers) as clients:
        _, home, travel, *attackers = clients
        assert (await register(home, email="own@example.com")).status_code == 201
        assert (await login(home, email="own@example.com")).status_code == 200  # known now
        for attacker in attackers:  # 3 each, under the per-address limit, 12 for the email
            for n in range(3):
                await login(attacker, email="own@example.com", password=f"guess-{n}-xxxx")
        # A new address meets the ceiling; the address the owner signed in from does not.
        assert (await login(travel, email="own@example.com")).status_code == 429
        assert (await login(home, email="own@example.com")).status_code == 200


async def test_registrations_are_limited_per_ip(settings):
    async with app_client(settings.replace(limit_register_ip=Rate(3, 3600))) as c:
        statuses = [(await register(c, email=f"r{i}@example.com")).status_code for i in range(5)]
    assert statuses == [201, 201, 201, 429, 429]


async def test_the_general_api_budget_is_per_ip_and_spares_operations(settings):
    async with app_client(settings.replace(limit_api_ip=Rate(5, 60))) as c:
        statuses = [(await c.get("/auth/me")).status_code for _ in range(7)]
        assert statuses == [401] * 5 + [429] * 2
        limited = await c.get("/auth/me")
        assert int(limited.headers["retry-after"]) > 0
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_an_ipv6_client_is_counted_by_its_64(settings):
    """A host that may take any address of its /64 gets one budget, not one per address; other
    networks, and IPv4 written as IPv6, count as what they are."""
    others = ("2001:db8:0:1::2", "2001:db8:0:1:ffff::9", "2001:db8:0:2::1", "::ffff:10.0.0.7")
    limited = settings.replace(limit_api_ip=Rate(3, 60))
    async with app_client(limited, "2001:db8:0:1::1", *others, "10.0.0.7") as clients:
        _, first, same, same_too, other_net, mapped, plain = clients
        statuses = [(await c.get("/auth/me")).status_code for c in (first, same, same_too, same)]
        assert statuses == [401, 401, 401, 429]
        assert (await other_net.get("/auth/me")).status_code == 401
        statuses = [(await c.get("/auth/me")).status_code for c in (mapped, plain, mapped, plain)]
        assert statuses == [401, 401, 401, 429]


def test_limit_subjects():
    from bilten.ratelimit import subject

    assert subject("192.0.2.1") == "192.0.2.1"
    assert subject("2001:DB8::1:2:3:4") == subject("2001:db8::5") == "2001:db8::/64"
    assert subject("::ffff:192.0.2.1") == "192.0.2.1"
    assert subject("fe80::1%eth0") == "fe80::/64"
    assert subject("not an address") == "not an address"


async def test_limits_are_shared_by_instances(settings):
    """Each instance counts locally and tells Redis every few milliseconds (bilten.budget):
    requests paced wider than that interval see the others' hits exactly."""
    limited = settings.replace(limit_api_ip=Rate(4, 60))
    async with app_client(limited) as a, app_client(limited) as b:
        statuses = []
        for i in range(6):
            statuses.append((await (a if i % 2 else b).get("/auth/me")).status_code)
            await asyncio.sleep(0.02)
    assert statuses == [401] * 4 + [429] * 2


async def test_one_instance_keeps_the_budget_exactly_under_a_burst(settings, redis):
    async with app_client(settings.replace(limit_api_ip=Rate(40, 60))) as c:
        statuses = await asyncio.gather(*(c.get("/auth/me") for _ in range(100)))
        assert sorted(r.status_code for r in statuses) == [401] * 40 + [429] * 60
        await asyncio.sleep(0.05)  # the last batch reaches Redis
    [counter] = await redis.keys("*api_ip*")
    assert int(await redis.get(counter)) >= 100  # every hit counted, refused ones too


async def test_a_burst_on_two_instances_overshoots_at_most_half_the_limit_once(settings):
    """Before its first batch returns, each instance knows only its own hits: together they
    may admit up to half the limit more, once; after that the shared count rules."""
    limited = settings.replace(limit_api_ip=Rate(40, 60))
    async with app_client(limited) as a, app_client(limited) as b:
        burst = await asyncio.gather(*(c.get("/auth/me") for _ in range(50) for c in (a, b)))
        admitted = sum(r.status_code == 401 for r in burst)
        assert 40 <= admitted <= 60
        await asyncio.sleep(0.05)
        later = [(await c.get("/auth/me")).status_code for c in (a, b, a, b)]
    assert later == [429] * 4


def test_a_verified_token_is_remembered_only_until_it_expires():
    """Verified tokens are cached by their text: an expired one is refused all the same, and
    a token that never verified is never remembered."""
    from bilten import tokens
    from bilten.settings import Settings

    signer = tokens.signer(Settings(secret_key=TEST_SECRET, access_token_ttl=60))
    now = time.time()
    short = signer.issue(
        "8d7f3c2a-0000-4000-8000-000000000001", "attendee", "a-session", now=now - 59
    )
    assert signer.verify(short).user_id.endswith("0001")
    assert short in signer.verified
    time.sleep(1.1)  # the cached claims are now past their expiry
    with pytest.raises(tokens.InvalidToken):
        signer.verify(short)
    assert short not in signer.verified
    with pytest.raises(tokens.InvalidToken):
        signer.verify("not.a.token")
    assert "not.a.token" not in signer.verified


@pytest.mark.parametrize(
    "email", ["victim@example.com,", "victim@example.com, other@example.com", "a b@x.com", "x@y"]
)
async def test_addresses_that_are_not_one_address_are_refused(client, email):
    response = await register(client, email=email)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["field"] == "email"
    forgot = await client.post("/auth/forgot-password", json={"email": email})
    assert forgot.status_code == 422


async def test_a_made_up_reset_token_costs_no_hashing(client, monkeypatch):
    from bilten.passwords import Passwords

    hashed = []
    original = Passwords.hash

    async def counting(self, password):
        hashed.append(password)
        return await original(self, password)

    monkeypatch.setattr(Passwords, "hash", counting)
    for n in range(5):
        response = await client.post(
            "/auth/reset-password", json={"token": f"made-up-{n}", "password": "a new password"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_token"
    assert hashed == []


async def test_reset_attempts_are_limited_per_ip(settings):
    async with app_client(settings.replace(limit_reset_ip=Rate(3, 3600))) as c:
        statuses = [
            (
                await c.post(
                    "/auth/reset-password", json={"token": f"t{n}", "password": "a new password"}
                )
            ).status_code
            for n in range(5)
        ]
    assert statuses == [400, 400, 400, 429, 429]


async def test_forgot_is_limited_per_ip_across_emails(settings):
    async with app_client(settings.replace(limit_forgot_ip=Rate(3, 3600))) as c:
        statuses = [
            (await c.post("/auth/forgot-password", json={"email": f"n{n}@example.com"})).status_code
            for n in range(5)
        ]
    assert statuses == [202, 202, 202, 429, 429]


async def test_a_session_ends_at_its_absolute_age_however_it_is_used(settings, client):
    from bilten import db

    first = (await register(client, email="long@example.com")).json()
    conn = await db.connect(settings.database_url)
    try:
        await conn.execute(
            "UPDATE refresh_tokens SET created_at = created_at - interval '91 days' "
            "WHERE user_id = $1",
            first["user"]["id"],
        )
    finally:
        await conn.close()
    refused = await client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert refused.status_code == 401


async def test_a_reused_refresh_token_ends_its_access_tokens_too(client):
    first = (await register(client, email="stolen@example.com")).json()
    token = first["refresh_token"]
    fresh = (await client.post("/auth/refresh", json={"refresh_token": token})).json()
    assert (await client.post("/auth/refresh", json={"refresh_token": token})).status_code == 401
    assert (await client.get("/auth/me", headers=bearer(fresh["access_token"]))).status_code == 401


@pytest.mark.parametrize("revocation", ["logout", "reset"])
async def test_a_refresh_under_way_never_outlives_a_revocation(client, settings, revocation):
    """A refresh in its transaction while the session is revoked (a logout, a password reset
    ending every session): the successor it issues is revoked too, not left alive."""
    from bilten import credentials, db

    made = await register(client, email=f"race-{revocation}@example.com")
    token, user_id = made.json()["refresh_token"], made.json()["user"]["id"]
    refreshing = await db.connect(settings.database_url)
    revoking = await db.connect(settings.database_url)
    try:
        transaction = refreshing.transaction()
        await transaction.start()
        rotated = await credentials.rotate(refreshing, token, 3600, 86400)  # not committed yet
        if revocation == "logout":
            revoke = credentials.revoke_family_of(revoking, token)
        else:
            revoke = credentials.revoke_all(revoking, user_id)
        revoked = asyncio.ensure_future(revoke)
        await asyncio.sleep(0.2)  # the revocation waits for the refresh
        await transaction.commit()
        assert await revoked == [rotated.session]
        successor = await revoking.fetchval(
            "SELECT revoked_at FROM refresh_tokens WHERE user_id = $1 AND spent_at IS NULL",
            user_id,
        )
    finally:
        await refreshing.close()
        await revoking.close()
    assert successor is not None
    again = await client.post("/auth/refresh", json={"refresh_token": rotated.token})
    assert again.status_code == 401, again.text

"""Access control with standard JWTs: every 401 and 403, with tokens minted here by PyJWT, as an outside issuer would."""

import time
from contextlib import nullcontext

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app import create_app
from support.clients import SECRET, token
from support.servers import close_app, development_server

PAGE = {"slug": "docs-intro", "html": "<p>x</p>"}


def tampered():
    """A valid token whose payload was edited afterwards to grant every slug: its signature no longer fits."""
    import base64
    import json

    header, _, signature = token(write=("docs-*",)).split(".")
    payload = json.dumps({"sub": "editor-1", "exp": int(time.time()) + 300,
                          "changefeed": {"read": ["*"], "write": ["*"]}}).encode()
    return ".".join([header, base64.urlsafe_b64encode(payload).rstrip(b"=").decode(), signature])


def bearer(value):
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def make_client(db_path):
    def make_client(**config):
        return create_app({"CHANGEFEED_DB": db_path, "CHANGEFEED_JWT_SECRET": SECRET, **config}).test_client()

    return make_client


def stored(client, slug="docs-intro"):
    return client.get(f"/changes?slug={slug}", headers=bearer(token())).get_json()["version"]


def assert_refused(response, status, code):
    body = response.get_json()
    assert response.status_code == status, body
    assert body["error"] == code.replace("_", " ") and body["message"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and f'error="{code}"' in challenge


UNAUTHORIZED = [
    ("no token", {}),
    ("not bearer", {"Authorization": f"Basic {SECRET}"}),
    ("garbage", bearer("not.a.jwt")),
    ("bad signature", bearer(token(key="another-secret-" + "f" * 64))),
    ("tampered", bearer(tampered())),
    ("expired", bearer(token(exp_in=-120))),  # past the 30 s leeway
    ("no exp", bearer(token(exp_in=None))),
    ("alg none", bearer(jwt.encode({"sub": "x", "exp": int(time.time()) + 60,
                                    "changefeed": {"write": ["*"]}}, None, algorithm="none"))),
    ("alg not configured", bearer(token(algorithm="HS512"))),
]


@pytest.mark.parametrize("name, headers", UNAUTHORIZED, ids=[case[0] for case in UNAUTHORIZED])
def test_a_save_without_a_valid_token_is_401_and_writes_nothing(make_client, name, headers):
    client = make_client()
    assert_refused(client.post("/save", json=PAGE, headers=headers), 401, "invalid_token")
    assert stored(client) == 0


def test_a_save_outside_the_tokens_rights_is_403_and_writes_nothing(make_client):
    client = make_client()
    for slug in ["home", "doc", "notdocs-x"]:
        response = client.post("/save", json={**PAGE, "slug": slug}, headers=bearer(token()))
        assert_refused(response, 403, "insufficient_scope")
        assert slug in response.get_json()["message"]
        assert stored(client, slug) == 0
    read_only = bearer(token(write=(), read=("*",)))
    assert_refused(client.post("/save", json=PAGE, headers=read_only), 403, "insufficient_scope")


def test_a_save_within_the_rights_is_taken(make_client):
    client = make_client()
    assert client.post("/save", json=PAGE, headers=bearer(token())).get_json()["version"] == 1
    everything = bearer(token(write=("*",)))
    assert client.post("/save", json={**PAGE, "slug": "HOME"}, headers=everything).get_json()["version"] == 1
    exact = bearer(token(write=("home",)))
    assert client.post("/save", json={**PAGE, "slug": "home"}, headers=exact).get_json()["version"] == 2


def test_reads_stay_public_unless_configured(make_client):
    client = make_client()
    assert client.get("/changes?slug=docs-intro").status_code == 200
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("path", ["/changes?slug=docs-intro", "/changes?slug=docs-intro&wait=1",
                                  "/events?slug=docs-intro"], ids=["poll", "long-poll", "events"])
def test_with_auth_reads_every_read_needs_read_rights(make_client, path):
    client = make_client(CHANGEFEED_AUTH_READS=1)
    for name, headers in UNAUTHORIZED:
        assert_refused(client.get(path, headers=headers), 401, "invalid_token")
    assert_refused(client.get(path, headers=bearer(token(read=("home",)))), 403, "insufficient_scope")
    allowed = client.get(path, headers=bearer(token(read=("docs-*",))), buffered=False)
    assert allowed.status_code == 200
    allowed.close()


def test_with_auth_reads_no_shared_cache_may_keep_an_answer(make_client):
    client = make_client(CHANGEFEED_AUTH_READS=1)
    client.post("/save", json=PAGE, headers=bearer(token()))
    for query in ("since=0", "since=1", "since=1&wait=1"):
        response = client.get(f"/changes?slug=docs-intro&{query}", headers=bearer(token()))
        assert response.headers["Cache-Control"] == "private, no-cache" and "X-Accel-Expires" not in response.headers


def test_issuer_and_audience_are_checked_when_configured(make_client):
    client = make_client(CHANGEFEED_JWT_ISSUER="https://id.example", CHANGEFEED_JWT_AUDIENCE="changefeed")
    good = token(iss="https://id.example", aud="changefeed")
    assert client.post("/save", json=PAGE, headers=bearer(good)).status_code == 200
    for bad in [token(aud="changefeed"), token(iss="https://evil.example", aud="changefeed"),
                token(iss="https://id.example"), token(iss="https://id.example", aud="other")]:
        assert_refused(client.post("/save", json=PAGE, headers=bearer(bad)), 401, "invalid_token")


def test_tokens_issued_elsewhere_verify_with_a_public_key_and_its_algorithm_only(db_path):
    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    client = create_app({"CHANGEFEED_DB": db_path, "CHANGEFEED_JWT_PUBLIC_KEY": public_pem}).test_client()
    assert client.post("/save", json=PAGE, headers=bearer(token(key=private, algorithm="ES256"))).status_code == 200
    # A token that picks an algorithm of its own (HMAC, as in the public-key-as-secret attack): refused.
    hmac = token(write=("*",), key="any-secret-" + "e" * 64, algorithm="HS256")
    assert_refused(client.post("/save", json=PAGE, headers=bearer(hmac)), 401, "invalid_token")


def test_flask_token_create_prints_a_token_the_service_accepts(make_client, db_path, monkeypatch):
    monkeypatch.setenv("CHANGEFEED_JWT_SECRET", SECRET)
    monkeypatch.setenv("CHANGEFEED_DB", db_path)
    app = create_app()
    result = app.test_cli_runner().invoke(args=["token", "create", "--sub", "editor-1", "--write", "docs-*",
                                                "--read", "*", "--ttl", "1h"])
    assert result.exit_code == 0, result.output
    minted = result.output.strip()
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "editor-1" and claims["changefeed"] == {"read": ["*"], "write": ["docs-*"]}
    assert 3590 <= claims["exp"] - time.time() <= 3600
    client = make_client()
    assert client.post("/save", json=PAGE, headers=bearer(minted)).status_code == 200
    bad_ttl = app.test_cli_runner().invoke(args=["token", "create", "--sub", "x", "--ttl", "soon"])
    assert bad_ttl.exit_code != 0 and "--ttl" in bad_ttl.output


def test_an_open_stream_and_a_long_poll_end_when_their_token_expires(make_server, open_stream):
    server = make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1",
                                          "CHANGEFEED_JWT_LEEWAY_S": "0"})
    short = token(exp_in=2)
    stream = open_stream(f"{server.url}/events?slug=docs-intro", headers=bearer(short))
    assert stream.response.status == 200
    started = time.monotonic()
    poll = requests.get(f"{server.url}/changes?slug=docs-intro&wait=30", headers=bearer(short), timeout=40)
    assert poll.status_code == 200 and time.monotonic() - started < 4  # cut at expiry, not after 30 s
    assert stream.ended.wait(timeout=5), "the stream outlived its token"
    after = requests.get(f"{server.url}/events?slug=docs-intro", headers=bearer(short), timeout=5)
    assert_refused_http(after, 401)


def assert_refused_http(response, status):
    assert response.status_code == status
    assert response.json()["error"] == "invalid token" and "Bearer" in response.headers["WWW-Authenticate"]


def test_a_token_traded_for_a_cookie_authorises_reads_only(make_client):
    client = make_client(CHANGEFEED_AUTH_READS=1)
    answer = client.post("/session", headers=bearer(token()))
    assert answer.status_code == 204
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=" in cookie
    assert client.get("/changes?slug=docs-intro").status_code == 200  # the cookie alone
    assert_refused(client.post("/save", json=PAGE), 401, "invalid_token")  # never for a write
    assert client.delete("/session").status_code == 204
    assert_refused(client.get("/changes?slug=docs-intro"), 401, "invalid_token")
    assert_refused(client.post("/session", headers=bearer(token(exp_in=-120))), 401, "invalid_token")


@pytest.mark.parametrize("peer, proto, secure", [
    ("127.0.0.1", None, False),      # plain HTTP, nobody says otherwise
    ("127.0.0.1", "https", True),    # TLS ended at a trusted proxy (nginx on this host)
    ("203.0.113.9", "https", False),  # anyone else saying so is not believed
], ids=["http", "https at a trusted proxy", "https claimed by a stranger"])
def test_the_read_cookie_is_secure_when_the_client_used_https(make_client, peer, proto, secure):
    client = make_client(CHANGEFEED_AUTH_READS=1)
    headers = {**bearer(token()), **({"X-Forwarded-Proto": proto} if proto else {})}
    cookie = client.post("/session", headers=headers, environ_base={"REMOTE_ADDR": peer}).headers["Set-Cookie"]
    assert ("; Secure" in cookie) is secure


BASIC = {"Authorization": "Basic dXNlcjpwYXNz"}  # what a browser adds to every request behind HTTP Basic auth


@pytest.mark.parametrize("path", ["/changes?slug=docs-intro", "/changes?slug=docs-intro&wait=1",
                                  "/events?slug=docs-intro"], ids=["poll", "long-poll", "events"])
def test_the_read_cookie_authorises_reads_beside_another_authorization_scheme(make_client, path):
    client = make_client(CHANGEFEED_AUTH_READS=1)
    assert client.post("/session", headers=bearer(token())).status_code == 204
    read = client.get(path, headers=BASIC, buffered=False)
    assert read.status_code == 200, read.get_data()
    read.close()
    assert_refused(client.get(path, headers=bearer("not.a.jwt")), 401, "invalid_token")  # a Bearer header wins
    client.delete("/session")
    assert_refused(client.get(path, headers=BASIC), 401, "invalid_token")  # no cookie: no token


# exp: the last second of year 9999 (a date one second later overflows), 2**63, and more than a float holds.
FAR_FUTURE = [253402300799, 2**63, 10**400]
FAR_FUTURE_IDS = ["year 9999", "2**63", "10**400"]
COOKIE_DAYS_S = 400 * 86400  # the longest a browser keeps a cookie (RFC 6265bis)


@pytest.mark.parametrize("exp", FAR_FUTURE, ids=FAR_FUTURE_IDS)
def test_a_token_expiring_far_in_the_future_gets_a_read_cookie_of_400_days(make_client, exp):
    client = make_client(CHANGEFEED_AUTH_READS=1)
    far = bearer(token(exp_in=None, exp=exp))
    answer = client.post("/session", headers=far)
    assert answer.status_code == 204, answer.get_data()
    assert f"Max-Age={COOKIE_DAYS_S};" in answer.headers["Set-Cookie"]
    assert client.get("/changes?slug=docs-intro&wait=1").status_code == 200  # a long-poll with the cookie
    assert client.post("/save", json=PAGE, headers=far).status_code == 200


# gevent takes a wait of any length; a thread's (flask run) ends in OverflowError past threading.TIMEOUT_MAX.
STREAMS = [*(pytest.param("flask run", exp, id=f"flask run, {name}") for exp, name in zip(FAR_FUTURE, FAR_FUTURE_IDS)),
           pytest.param("gunicorn", 10**400, id="gunicorn, 10**400")]


@pytest.mark.parametrize("serve, exp", STREAMS)
def test_a_stream_with_a_token_expiring_far_in_the_future_opens_and_goes_on(make_server, database, open_stream,
                                                                            serve, exp):
    """The stream waits until its token's expiry: a wait longer than the clock functions take (OverflowError)."""
    far = bearer(token(exp_in=None, exp=exp))
    env = {"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1"}
    app = None
    if serve == "gunicorn":
        served = nullcontext(make_server(workers=1, env=env).url)
    else:
        app = create_app({**database.config, **env})
        served = development_server(app)
    with served as url:
        assert requests.post(f"{url}/save", json=PAGE, headers=far, timeout=10).status_code == 200
        stream = open_stream(f"{url}/events?slug=docs-intro", headers=far)
        assert stream.response.status == 200
        assert stream.next() == {"retry": "2000"}
        assert stream.next()["data"]["version"] == 1
        assert requests.post(f"{url}/save", json=PAGE, headers=far, timeout=10).status_code == 200
        assert stream.next()["data"]["version"] == 2  # still open after its first wait
        stream.close()
    if app is not None:
        close_app(app)


def test_an_expired_cookie_token_is_refused_like_a_header(make_client):
    client = make_client(CHANGEFEED_AUTH_READS=1)
    client.set_cookie("changefeed_read", token(exp_in=-120))
    assert_refused(client.get("/changes?slug=docs-intro"), 401, "invalid_token")


def test_tokens_of_an_identity_provider_verify_with_its_jwks_url(db_path):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    keys = json.dumps({"keys": [{**jwk, "kid": "key-1", "use": "sig", "alg": "RS256"}]}).encode()

    class Provider(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(keys)

        def log_message(self, *args):
            pass

    provider = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    try:
        client = create_app({"CHANGEFEED_DB": db_path,
                             "CHANGEFEED_JWKS_URL": f"http://127.0.0.1:{provider.server_port}/jwks.json"}).test_client()
        signed = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "changefeed": {"write": ["*"]}},
                            private, algorithm="RS256", headers={"kid": "key-1"})
        assert client.post("/save", json=PAGE, headers=bearer(signed)).status_code == 200
        unknown = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "changefeed": {"write": ["*"]}},
                             private, algorithm="RS256", headers={"kid": "key-2"})
        assert_refused(client.post("/save", json=PAGE, headers=bearer(unknown)), 401, "invalid_token")
        provider.shutdown()
        provider.server_close()
        down = create_app({"CHANGEFEED_DB": db_path,
                           "CHANGEFEED_JWKS_URL": f"http://127.0.0.1:{provider.server_port}/jwks.json"}).test_client()
        answer = down.post("/save", json=PAGE, headers=bearer(signed))
        assert answer.status_code == 503 and answer.get_json()["error"] == "unavailable"
    finally:
        provider.server_close()


@pytest.mark.parametrize("write", ["docs-*", ["docs-*", 7, None], {"docs-*": True}, 42],
                         ids=["a lone string", "non-strings in the list", "an object", "a number"])
def test_a_malformed_rights_claim_grants_no_more_than_it_says(make_client, write):
    client = make_client()
    odd = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "changefeed": {"write": write}}, SECRET,
                     algorithm="HS256")
    assert_refused(client.post("/save", json={**PAGE, "slug": "home"}, headers=bearer(odd)), 403,
                   "insufficient_scope")
    expected = 200 if write in ("docs-*", ["docs-*", 7, None]) else 403
    assert client.post("/save", json=PAGE, headers=bearer(odd)).status_code == expected

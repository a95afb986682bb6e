"""Unit tests of changefeed/security/tokens.py: rights from a verified token, and what is refused."""

import time

import jwt
import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from changefeed.core.settings import DEFAULTS
from changefeed.security.tokens import (
    CLAIM,
    LAST_DATE,
    MAX_LIFETIME_S,
    READ_COOKIE,
    AuthError,
    Rights,
    TokenVerifier,
    bearer_token,
    read_token,
)

SECRET = "a-test-secret-of-at-least-32-bytes!!"


def verifier(**settings):
    return TokenVerifier({**DEFAULTS, "CHANGEFEED_JWT_SECRET": SECRET, **settings})


def signed(claims):
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_access_control_is_off_without_a_key():
    assert not TokenVerifier(DEFAULTS).enabled
    assert verifier().enabled


def test_a_minted_token_verifies_to_its_rights():
    rights = verifier().verify_token(verifier().mint("editor-1", read=["*"], write=["docs-*", "home"], metrics=True))
    assert (rights.sub, rights.read, rights.write, rights.metrics) == ("editor-1", ("*",), ("docs-*", "home"), True)
    assert 3500 < rights.seconds_left() <= 3600 + int(DEFAULTS["CHANGEFEED_JWT_LEEWAY_S"])


def test_rights_allow_a_slug_listed_or_under_a_prefix_and_refuse_others_with_403():
    rights = Rights(sub="editor-1", read=("*",), write=("docs-*", "Home"), expires_at=time.time() + 60)
    assert rights.require("write", "docs-intro") is rights
    assert rights.require("write", "home") is rights  # entries are folded to lower case, as slugs are
    assert rights.require("read", "anything") is rights
    with pytest.raises(AuthError) as refused:
        rights.require("write", "blog")
    assert (refused.value.status, refused.value.error) == (403, "insufficient scope")
    assert 'error="insufficient_scope"' in refused.value.details["headers"]["WWW-Authenticate"]


def test_a_lone_string_in_a_right_is_one_entry_not_its_letters():
    rights = verifier().verify_token(signed({"sub": "x", "exp": int(time.time()) + 60,
                                             CLAIM: {"write": "docs-*", "read": [1, "home"]}}))
    assert (rights.write, rights.read) == (("docs-*",), ("home",))
    with pytest.raises(AuthError):
        rights.require("write", "d")


def test_metrics_need_the_claim_to_say_true():
    rights = verifier().verify_token(signed({"sub": "x", "exp": int(time.time()) + 60, CLAIM: {"metrics": "yes"}}))
    with pytest.raises(AuthError) as refused:
        rights.require_metrics()
    assert refused.value.status == 403


def test_an_expired_token_is_refused_with_401_marked_expired():
    with pytest.raises(AuthError) as refused:
        verifier(CHANGEFEED_JWT_LEEWAY_S=0).verify_token(signed({"sub": "x", "exp": int(time.time()) - 5}))
    assert (refused.value.status, refused.value.expired) == (401, True)


@pytest.mark.parametrize("token", [
    jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "another-secret-of-at-least-32-bytes", algorithm="HS256"),
    jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, None, algorithm="none"),
    jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"),  # no exp
    "not.a.token",
])
def test_a_forged_unsigned_unbounded_or_unreadable_token_is_refused_with_401(token):
    with pytest.raises(AuthError) as refused:
        verifier().verify_token(token)
    assert (refused.value.status, refused.value.expired) == (401, False)


def test_the_issuer_and_audience_are_checked_when_configured():
    strict = verifier(CHANGEFEED_JWT_ISSUER="https://id.example", CHANGEFEED_JWT_AUDIENCE="changefeed")
    assert strict.verify_token(strict.mint("x")).sub == "x"
    with pytest.raises(AuthError):
        strict.verify_token(verifier().mint("x"))


def test_a_date_far_in_the_future_is_capped():
    rights = verifier().verify_token(signed({"sub": "x", "exp": 10**15}))
    assert rights.expires_at == LAST_DATE + int(DEFAULTS["CHANGEFEED_JWT_LEEWAY_S"])
    assert rights.seconds_left() == MAX_LIFETIME_S


def test_a_verifier_with_a_public_key_only_cannot_mint():
    with pytest.raises(RuntimeError, match="CHANGEFEED_JWT_SECRET"):
        TokenVerifier({**DEFAULTS, "CHANGEFEED_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----"}).mint("x")


@pytest.mark.parametrize("header", [None, "", "Bearer ", "Basic dXNlcjpwYXNz", "token abc"])
def test_a_missing_or_other_authorization_is_refused_with_401_saying_what_to_send(header):
    with pytest.raises(AuthError) as refused:
        bearer_token(header)
    assert refused.value.status == 401 and "Authorization: Bearer" in refused.value.message


def test_the_bearer_scheme_is_read_whatever_its_case():
    assert bearer_token("bearer  abc ") == "abc"


def request(**headers):
    return Request(EnvironBuilder(path="/events", headers=headers).get_environ())


def test_a_read_takes_its_bearer_header_before_its_cookie_and_a_basic_header_does_not_hide_the_cookie():
    cookie = f"{READ_COOKIE}=from-cookie"
    assert read_token(request(Authorization="Bearer from-header", Cookie=cookie)) == "from-header"
    assert read_token(request(Authorization="Basic dXNlcjpwYXNz", Cookie=cookie)) == "from-cookie"
    assert read_token(request()) is None

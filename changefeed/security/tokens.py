"""Who may read and write which pages: standard JWTs (RFC 7519), verified with PyJWT.

Off by default. A secret (HS256) or a public key (PEM, for RS256/ES256
tokens issued elsewhere) turns it on; the accepted algorithms come from the
configuration, never from the token, so a token cannot choose "none" or sign
with the public key as an HMAC secret. Rights live in one claim:

    {"sub": "editor-1", "exp": ..., "changefeed": {"read": ["*"], "write": ["docs-*", "home"]}}

Each entry is a slug, or a prefix ending in `*`; `*` alone is every slug.
`"metrics": true` in the claim lets a scraper read GET /metrics (ops/metrics.py).
Errors follow RFC 6750: 401 `invalid_token` for a missing, unreadable,
forged or expired token, 403 `insufficient_scope` for a slug outside its
rights, each with a `WWW-Authenticate: Bearer` header.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
from flask import has_request_context, request
from werkzeug.wrappers import Request

from changefeed.core.errors import ApiError
from changefeed.core.outcomes import Unavailable
from changefeed.core.schemas import has_surrogate
from changefeed.core.settings import Config
from changefeed.ops import logs

CLAIM = "changefeed"

# Browsers cannot give EventSource an Authorization header, and a token in a
# URL ends up in access logs and histories. So the page trades its token for
# this cookie: HttpOnly (no script reads it), SameSite=Strict (no other site's
# request carries it) and honoured for reads only, so a form elsewhere can
# never use it to write.
READ_COOKIE = "changefeed_read"

# A token may say it expires in the year 10000, or later than a float can hold. Its rights are taken to
# last at most this long: 400 days, the longest a browser keeps a cookie (RFC 6265bis), and a wait or
# a date any clock function can take (a read cookie, a stream's end, a WebSocket's, a long-poll's).
MAX_LIFETIME_S = 400 * 86400
LAST_DATE = 253402300799  # 9999-12-31T23:59:59Z: an `exp` past it is taken as this


class AuthError(ApiError):
    """A 401 or 403 in the service's error shape, with the RFC 6750 header."""

    expired = False  # a 401 for a token that was valid until its `exp` (a WebSocket closes 4001 for it)

    def __init__(self, status: int, code: str, message: str) -> None:
        challenge = f'Bearer realm="changefeed", error="{code}", error_description="{message.replace(chr(34), "")}"'
        super().__init__(status, code.replace("_", " "), message, headers={"WWW-Authenticate": challenge})


@dataclass(frozen=True)
class Rights:
    """What one verified token allows, and until when."""

    sub: str | None
    read: tuple[str, ...]  # slugs, or prefixes ending in `*`
    write: tuple[str, ...]
    expires_at: float  # unix time
    metrics: bool = False  # may read GET /metrics: `"metrics": true` in the claim

    def require(self, right: str, slug: str) -> "Rights":
        """Raise 403 unless this token may `right` ("read" or "write") the page `slug`."""
        if not any(_matches(pattern, slug) for pattern in getattr(self, right)):
            raise AuthError(403, "insufficient_scope",
                            f"This token ({self.sub or 'no sub'}) may not {right} the page {slug!r}: "
                            f"ask its issuer for one whose `{CLAIM}` claim lists it under `{right}`.")
        return self

    def may(self, right: str, slug: str) -> bool:
        """Whether this token may `right` ("read" or "write") the page `slug`."""
        return any(_matches(pattern, slug) for pattern in getattr(self, right))

    def require_prefix(self, right: str, prefix: str) -> "Rights":
        """Raise 403 unless this token may `right` every page whose slug starts with `prefix`."""
        if not any(_covers(pattern, prefix) for pattern in getattr(self, right)):
            raise AuthError(403, "insufficient_scope",
                            f"This token ({self.sub or 'no sub'}) may not {right} every page under the prefix "
                            f"{prefix!r}: ask for a prefix its `{CLAIM}` claim lists under `{right}` (as "
                            f"`{prefix or 'docs-'}*`, or a longer one), or leave the prefix out to get only "
                            "the pages it may read.")
        return self

    def require_metrics(self) -> "Rights":
        """Raise 403 unless this token may read GET /metrics."""
        if not self.metrics:
            raise AuthError(403, "insufficient_scope",
                            f"This token ({self.sub or 'no sub'}) may not read the metrics: ask its issuer "
                            f"for one whose `{CLAIM}` claim has `\"metrics\": true`.")
        return self

    def seconds_left(self) -> float:
        """Seconds until the token expires, at most MAX_LIFETIME_S."""
        return min(self.expires_at - time.time(), MAX_LIFETIME_S)


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or raise 401."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "invalid_token", "This needs a token: send Authorization: Bearer <token> "
                                              "(a JWT from your identity provider, or `flask token create`).")
    return token.strip()


def read_token(request: Request) -> str | None:
    """The token a read carries: its `Authorization: Bearer` header's, else the read cookie's, else None.

    Only a Bearer header outranks the cookie: behind HTTP Basic auth a browser
    adds `Authorization: Basic ...` to every request, cookie reads included.
    """
    header = request.headers.get("Authorization")
    if header is not None and header.partition(" ")[0].lower() == "bearer":
        return bearer_token(header)
    return request.cookies.get(READ_COOKIE) or None


def _patterns(value: object) -> tuple[str, ...]:
    """The entries of a right: a list of strings (a lone string is one entry, anything else none).

    Never tuple() of a string: "docs-*" would become the entries d, o, c, s, -
    and *, and the last one grants every slug.
    """
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(entry for entry in value if isinstance(entry, str))
    return ()


def _matches(pattern: str, slug: str) -> bool:
    pattern = pattern.lower()
    return pattern == "*" or pattern == slug or (pattern.endswith("*") and slug.startswith(pattern[:-1]))


def _covers(pattern: str, prefix: str) -> bool:
    """Whether `pattern` matches every slug that starts with `prefix` (a prefix pattern no longer than it)."""
    pattern = pattern.lower()
    return pattern.endswith("*") and prefix.startswith(pattern[:-1])


class TokenVerifier:
    """Checks bearer tokens against the configured key, algorithms, issuer and audience."""

    def __init__(self, config: Config) -> None:
        self.secret: str | None = config["CHANGEFEED_JWT_SECRET"] or None
        public_key: str | None = config["CHANGEFEED_JWT_PUBLIC_KEY"] or None
        jwks_url: str | None = config["CHANGEFEED_JWKS_URL"] or None
        self._key = self.secret or public_key
        # Keys of an identity provider, fetched when a token names one not seen yet, kept 5 minutes.
        self._jwks = jwt.PyJWKClient(jwks_url, lifespan=300, timeout=5) if jwks_url and not self._key else None
        self.enabled = self._key is not None or self._jwks is not None
        default_algorithms = "HS256" if self.secret else "RS256,ES256"
        self.algorithms: list[str] = (config["CHANGEFEED_JWT_ALGORITHMS"] or default_algorithms).replace(",", " ").split()
        self.issuer: str | None = config["CHANGEFEED_JWT_ISSUER"] or None
        self.audience: str | None = config["CHANGEFEED_JWT_AUDIENCE"] or None
        self.leeway: int = config["CHANGEFEED_JWT_LEEWAY_S"]
        self.reads = bool(config["CHANGEFEED_AUTH_READS"])

    def verify(self, authorization: str | None) -> Rights:
        """Return the Rights of an `Authorization: Bearer <token>` header, or raise 401."""
        return self.verify_token(bearer_token(authorization))

    def verify_token(self, token: str) -> Rights:
        """Return the Rights of a token, or raise 401 saying why it was refused."""
        try:
            if self._key is not None:
                key = self._key
            elif self._jwks is not None:
                key = self._jwks.get_signing_key_from_jwt(token).key
            else:  # a bug of the caller: with access control off, no token is asked for
                raise RuntimeError("access control is off: there is no key to verify a token with")
            claims = jwt.decode(token, key, algorithms=self.algorithms, issuer=self.issuer,
                                audience=self.audience, leeway=self.leeway,
                                options={"require": ["exp"], "verify_aud": self.audience is not None})
        except jwt.PyJWKClientConnectionError as exc:  # the provider's keys cannot be fetched: not the client's fault
            raise Unavailable(f"the token's signing keys cannot be fetched from the JWKS URL ({exc})") from None
        except jwt.PyJWKClientError as exc:  # no key of the provider's matches the token's `kid`
            raise AuthError(401, "invalid_token", f"The token's signing key is not known here: {exc}.") from None
        except jwt.ExpiredSignatureError:
            error = AuthError(401, "invalid_token", "The token expired: get a fresh one.")
            error.expired = True
            raise error from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "invalid_token", "The token's signature is not valid for this service.") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, "invalid_token", f"The token was refused: {exc}.") from None
        sub = claims.get("sub")
        if isinstance(sub, str) and has_surrogate(sub):
            # It names the user in presence lists and log lines: text that cannot be encoded would fail
            # there, in the middle of other users' beats. The message leaves it out for the same reason.
            raise AuthError(401, "invalid_token", "The token was refused: its `sub` claim contains an unpaired "
                                                  "surrogate (U+D800 to U+DFFF), not valid Unicode text.")
        if has_request_context():  # who made this request, for its log lines (ops/logs.py)
            request.environ[logs.SUB] = claims.get("sub")
        claim = claims.get(CLAIM)
        rights: dict[str, object] = claim if isinstance(claim, dict) else {}
        expires_at = min(int(claims["exp"]), LAST_DATE) + self.leeway  # PyJWT checked that int() takes it
        return Rights(sub=claims.get("sub"), read=_patterns(rights.get("read")),
                      write=_patterns(rights.get("write")), expires_at=expires_at,
                      metrics=rights.get("metrics") is True)

    def read_rights(self, request: Request) -> Rights:
        """The Rights of a read: from its Bearer header, or else from the read cookie (see read_token)."""
        token = read_token(request)
        if token is None:
            return self.verify(request.headers.get("Authorization"))  # the 401 that says what to send
        return self.verify_token(token)

    def mint(self, sub: str, read: Iterable[str] = (), write: Iterable[str] = (), ttl_s: float = 3600,
             metrics: bool = False) -> str:
        """Sign a token with the configured secret (for `flask token create`)."""
        if not self.secret:
            raise RuntimeError("set CHANGEFEED_JWT_SECRET to mint tokens here (a public key only verifies)")
        rights: dict[str, object] = {"read": list(read), "write": list(write)}
        if metrics:
            rights["metrics"] = True
        claims: dict[str, object] = {"sub": sub, "iat": int(time.time()), "exp": int(time.time() + ttl_s),
                                     CLAIM: rights}
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience
        return jwt.encode(claims, self.secret, algorithm=self.algorithms[0])

"""The errors a call can raise: one base class, and a subclass for each answer a program acts on differently."""

from typing import Any


class ChangefeedError(Exception):
    """The service refused the request, or could not be reached in time.

    `status` is the HTTP status (None when no answer came), `error` the
    service's short stable phrase (`"conflict"`, `"invalid request"`, ...),
    `answer` the whole JSON error it sent, `request_id` the id to look for in
    its logs.
    """

    def __init__(self, message: str, status: int | None = None, answer: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.answer = answer or {}
        self.error: str | None = self.answer.get("error")
        self.request_id: str | None = self.answer.get("request_id")


class Conflict(ChangefeedError):
    """409: `base_version` is not the stored version; nothing was written. `version` is the stored one."""

    def __init__(self, message: str, status: int | None = None, answer: dict[str, Any] | None = None) -> None:
        super().__init__(message, status, answer)
        self.version: int = self.answer.get("version", 0)


class InvalidRequest(ChangefeedError):
    """422: `fields` maps each bad field (or header) to its reasons; nothing was written."""

    def __init__(self, message: str, status: int | None = None, answer: dict[str, Any] | None = None) -> None:
        super().__init__(message, status, answer)
        self.fields: dict[str, list[str]] = self.answer.get("fields", {})


class AuthError(ChangefeedError):
    """401 or 403: no token, a bad or expired one, or one without the right to this page."""


class TooManyRequests(ChangefeedError):
    """429: a limit of this client (its open streams, a presence beat too soon); `retry_after` in seconds."""

    def __init__(self, message: str, status: int | None = None, answer: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status, answer)
        self.retry_after = retry_after


class Unavailable(ChangefeedError):
    """The service did not answer, or answered 408, 502, 503 or 504, for as long as the call was allowed to retry.

    For a save this means it may or may not be stored: save again with the
    same `idempotency_key` to learn which, and never store it twice.
    """

    def __init__(self, message: str, status: int | None = None, answer: dict[str, Any] | None = None,
                 idempotency_key: str | None = None) -> None:
        super().__init__(message, status, answer)
        self.idempotency_key = idempotency_key


def error_for(status: int, answer: dict[str, Any], retry_after: float | None = None) -> ChangefeedError:
    """The exception for an error answer of the service."""
    message = f"{status} {answer.get('error', 'error')}: {answer.get('message', '')}".rstrip(": ")
    if status == 409:
        return Conflict(message, status, answer)
    if status == 422:
        return InvalidRequest(message, status, answer)
    if status in (401, 403):
        return AuthError(message, status, answer)
    if status == 429:
        return TooManyRequests(message, status, answer, retry_after)
    if status in RETRIED_STATUSES:
        return Unavailable(message, status, answer)
    return ChangefeedError(message, status, answer)


# Answers that say "not now" and store nothing, or (503 outcome unknown) that a
# retry with the same Idempotency-Key settles: a proxy's 502 and 504 while the
# server restarts, the service's 503 busy, not saved, unavailable, shutting down.
RETRIED_STATUSES = frozenset({408, 429, 502, 503, 504})

"""When to try again, and how long to wait first: the same rules for the sync and the async client.

Nothing here does I/O. A caller sends the request, hands the answer (or the
error) to `Attempts` or `Reconnect`, and sleeps for the delay it gets back.
"""

import json
import random
import time
from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from .errors import RETRIED_STATUSES, ChangefeedError, Unavailable, error_for


def retry_after(response: httpx.Response) -> float | None:
    """The `Retry-After` header in seconds (the service sends whole seconds), or None."""
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:  # absent, or an HTTP date, which the service never sends
        return None


def json_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of an answer, or an empty one when a proxy answered with something else."""
    try:
        answer = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return answer if isinstance(answer, dict) else {}


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """A delay drawn from 0 to base * 2**attempt (at most `cap`): retries of many clients spread out, not in waves."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


class Attempts:
    """The attempts of one request that is safe to repeat: a read, or a save with its Idempotency-Key.

    Connection errors, timeouts and the statuses that store nothing (or that a
    retry with the same key settles) are tried again after a full-jitter delay,
    or after `Retry-After` when the service says how long, until `retry_for`
    seconds have passed since the first attempt.
    """

    def __init__(self, what: str, retry_for: float, base: float = 0.25, cap: float = 5.0,
                 idempotency_key: str | None = None) -> None:
        self.what, self.base, self.cap, self.idempotency_key = what, base, cap, idempotency_key
        self.deadline = time.monotonic() + retry_for
        self.attempt = 0

    def answered(self, response: httpx.Response) -> float:
        """The delay before the next attempt, after an answer that is not a success; raises when there is none."""
        answer = json_of(response)
        error = error_for(response.status_code, answer, retry_after(response))
        if response.status_code not in RETRIED_STATUSES:
            raise error
        return self._next(error, retry_after(response))

    def failed(self, cause: httpx.TransportError) -> float:
        """The delay before the next attempt, after no answer at all (refused, cut off, timed out)."""
        return self._next(Unavailable(f"{self.what}: no answer from the service ({type(cause).__name__}: {cause})"),
                          None, cause)

    def _next(self, error: ChangefeedError, wait: float | None, cause: BaseException | None = None) -> float:
        delay = max(wait or 0.0, full_jitter(self.attempt, self.base, self.cap))
        self.attempt += 1
        if time.monotonic() + delay > self.deadline:
            if not isinstance(error, Unavailable):  # a 429 given up on, say: the caller learns why
                raise error from cause
            error.idempotency_key = self.idempotency_key
            raise error from cause
        return delay


class Reconnect:
    """When an event stream opens again after it ended or failed: never a busy loop, never given up.

    The first wait is the service's `retry:` (2 s by default), jittered down to
    half of it so that the clients of a restarted server come back spread out;
    each failure in a row doubles it, up to `cap`; an open stream starts the
    count again.
    """

    def __init__(self, cap: float = 30.0) -> None:
        self.retry = 2.0
        self.cap = cap
        self.failures = 0

    def answered(self, response: httpx.Response) -> float | None:
        """None when the stream is open; else the delay before trying again, or the error when retrying is useless."""
        if response.status_code == 200:
            return None  # the count starts again at its first event: a 200 that is no stream is a failure too
        if response.status_code not in RETRIED_STATUSES:
            raise error_for(response.status_code, json_of(response), retry_after(response))
        return max(retry_after(response) or 0.0, self._delay())

    def saw(self, event: ServerSentEvent) -> None:
        """An event came: the stream works (the failures in a row are over); take its `retry:` suggestion."""
        self.failures = 0
        if event.retry is not None and event.retry >= 0:
            self.retry = event.retry / 1000

    def ended(self) -> float:
        """The delay after a stream the service closed (a deploy, a restart)."""
        return self._delay()

    def failed(self) -> float:
        """The delay after a connection that failed or broke."""
        return self._delay()

    def _delay(self) -> float:
        delay = min(self.cap, self.retry * 2 ** self.failures) * random.uniform(0.5, 1.0)
        self.failures += 1
        return delay

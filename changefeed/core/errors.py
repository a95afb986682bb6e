"""The two exceptions any layer may raise to end a request with an answer.

`ApiError` carries the status, the stable `error` phrase and the message the
one error shape (http/errors.py) sends; `ShuttingDown` says this worker is
stopping. They live here, below everything, so that the security checks and
the presence model can raise them without importing the HTTP layer.
"""


class ShuttingDown(Exception):
    """This worker is stopping: the client should ask again, on a new connection."""


class ApiError(Exception):
    """An error a view raises to answer with the envelope."""

    def __init__(self, status: int, error: str, message: str, **details: object) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.details = status, error, message, details

"""A stream's wait handed to the server that serves it: a plain type the transports and the server share."""

import threading
from typing import NamedTuple


class Parked(NamedTuple):
    """A stream's wait handed to the server, which holds the connection meanwhile without a greenlet.

    A stream yields this instead of calling Subscription.wait() when the
    server offers it (environ["changefeed.park"]: ops/worker.py). The server
    goes on with the stream once `woken` is set or `timeout` seconds passed;
    the stream then calls Subscription.resumed(). An idle greenlet costs
    about 8 KiB (its saved C stack, its first page of Python frames): at
    50,000 open streams, 400 MB for waiting.
    """

    woken: threading.Event
    timeout: float | None

"""Event streams held without a greenlet while they wait, and the few greenlets that go on with them.

A stream that waits for its next event yields a `Parked` (core/parked.py)
to the worker's handler (ops/worker.py), which keeps the connection and
lets the greenlet that served the request end. A waiting greenlet costs
about 8 KiB (its saved C stack, its first page of Python frames, measured);
most of 50,000 open streams are waiting. When the stream is woken (a save,
a heartbeat tick, its client gone, its token expiring) `Resume` hands it to
`Runners`, which writes what it yields until it parks again.
"""

import io
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
from gevent.pywsgi import WSGIServer

log = logging.getLogger(__name__)

NO_BODY = io.BytesIO(b"")  # a parked stream's wsgi.input: it reads nothing more


class Resume:
    """Calls `go_on()` once, from the event loop, when the event `woken` is set or `timeout_s` passes.

    An object, not a closure: a closure that unlinks itself refers to itself,
    a cycle that would keep the whole connection until the collector's rare
    full pass (gunicorn.conf.py).
    """

    __slots__ = ("woken", "timer", "go_on")
    go_on: Callable[[], None] | None

    def __init__(self, woken: Any, timeout_s: float | None, go_on: Callable[[], None]) -> None:
        self.woken, self.go_on = woken, go_on  # go_on: None once called
        self.timer = None if timeout_s is None else gevent.get_hub().loop.timer(timeout_s)
        if self.timer is not None:
            self.timer.start(self)
        woken.rawlink(self)

    def __call__(self, _event: object = None) -> None:
        go_on, self.go_on = self.go_on, None
        if go_on is None:  # the other of the two fired first
            return
        self.woken.unlink(self)
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        go_on()


class Runners:
    """The greenlets that go on with woken parked streams, one stream's turn after another.

    A turn writes an event or two and parks again: a few microseconds,
    against 9 for waking a greenlet of its own and 13 for spawning one. One
    runner takes a whole burst; whenever every runner is in a turn, one more
    is started for the turns behind it, so a turn that waits (a client that
    stopped reading, a database read that yields) holds up no other stream.
    """

    IDLE_S = 10.0  # a runner with nothing to do for this long ends

    def __init__(self) -> None:
        self._turns: deque[Callable[[], None]] = deque()
        self._waiting: list[gevent.event.Event] = []  # idle runners' wake-ups
        self._idle = 0
        self._running = 0  # turns under way

    def busy(self) -> bool:
        """Whether a turn is under way or waiting for a runner."""
        return bool(self._turns) or self._running > 0

    def put(self, turn: Callable[[], None]) -> None:
        self._turns.append(turn)
        if self._waiting:
            self._waiting.pop().set()
        elif self._idle == 0:
            self._idle += 1  # counted from now: it takes the next turn
            gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            if not self._turns:
                wake = gevent.event.Event()
                self._waiting.append(wake)
                # Still listed after the wait: no put() chose it (one may have, as its time ran out).
                if not wake.wait(self.IDLE_S) and wake in self._waiting:
                    self._waiting.remove(wake)
                    self._idle -= 1
                    return
                if not self._turns:
                    continue
            turn = self._turns.popleft()
            self._idle -= 1
            if self._turns and self._idle == 0:  # should this turn wait, the next ones still go on
                self._idle += 1
                gevent.spawn(self._run)
            self._running += 1
            try:
                turn()
            except Exception:
                log.exception("a parked stream's turn failed")
            finally:
                self._running -= 1
            self._idle += 1


class ParkingServer(WSGIServer):
    """gevent's server, which does not close the connection of a parked stream when its greenlet ends."""

    parked: set[socket.socket]
    runners: Runners
    instances: list["ParkingServer"]  # every server made of this class (the worker's: see Worker.run)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parked, self.runners = set(), Runners()
        self.instances.append(self)

    def holding(self) -> bool:
        """Whether a parked stream or socket is still open here, or being gone on with."""
        return bool(self.parked) or self.runners.busy()

    def do_close(self, sock: socket.socket, *args: object) -> None:
        if sock not in self.parked:
            super().do_close(sock, *args)



"""Unit tests of changefeed/ops/parking.py: the greenlets that go on with woken streams (gevent, no server)."""

import gevent
import gevent.event

from changefeed.ops.parking import Resume, Runners


def test_a_turn_that_waits_holds_up_no_other_turn():
    runners, done = Runners(), []

    def slow():  # a client that stopped reading: its write waits
        gevent.sleep(0.3)
        done.append("slow")

    runners.put(slow)
    runners.put(lambda: done.append("fast"))
    gevent.sleep(0.1)
    assert done == ["fast"]
    gevent.sleep(0.4)
    assert done == ["fast", "slow"]


def test_a_burst_of_turns_runs_in_order_without_a_greenlet_each():
    runners, done = Runners(), []
    for n in range(1000):
        runners.put(lambda n=n: done.append(n))
    gevent.sleep(0.05)
    assert done == list(range(1000))
    # The runner that took them all, and the one started in case its first turn waited: both idle now.
    assert runners._idle == 2 and len(runners._waiting) == 2


def test_a_turn_put_as_idle_runners_end_still_runs(monkeypatch):
    monkeypatch.setattr(Runners, "IDLE_S", 0.02)
    runners, done = Runners(), []
    for n in range(20):
        runners.put(lambda n=n: done.append(n))
        gevent.sleep(0.01 + (n % 3) * 0.01)  # now and then after the idle runner ended
    gevent.sleep(0.05)
    assert done == list(range(20))
    assert runners._idle == 0 and runners._waiting == []  # every runner ended, none left counted


def test_resume_goes_on_once_when_woken_or_when_its_time_runs_out():
    woken, calls = gevent.event.Event(), []
    Resume(woken, None, lambda: calls.append("woken"))
    woken.set()
    woken.set()
    gevent.sleep(0.01)
    assert calls == ["woken"]
    later = gevent.event.Event()
    Resume(later, 0.02, lambda: calls.append("timeout"))
    gevent.sleep(0.05)
    later.set()
    gevent.sleep(0.01)
    assert calls == ["woken", "timeout"]

"""Unit tests of changefeed/security/limits.py: the wait gate's counts, and the query cache's budget."""

import pytest
from marshmallow import ValidationError
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from changefeed.core.clients import parse_networks
from changefeed.core.schemas import ChangesQuerySchema
from changefeed.security.limits import Held, QueryCache, TooManyWaits, WaitGate, descriptor_budget

PROXIES = parse_networks("127.0.0.1")


def environ(peer):
    return {"REMOTE_ADDR": peer}


def test_the_descriptor_budget_never_raises_a_cap_and_never_goes_below_one():
    assert descriptor_budget(10) == 10
    assert 1 <= descriptor_budget(10**9) < 10**9


def test_a_client_past_its_cap_gets_429_and_the_refusal_is_counted():
    refusals = []
    gate = WaitGate(per_worker=100, per_client=2, proxies=PROXIES, on_refusal=refusals.append)
    gate.enter(environ("203.0.113.1"))
    gate.enter(environ("203.0.113.1"))
    with pytest.raises(TooManyWaits) as refused:
        gate.enter(environ("203.0.113.1"))
    assert (refused.value.status, refused.value.limit, refused.value.details["headers"]) == (
        429, "waits_per_client", {"Retry-After": "5"})
    assert refusals == ["waits_per_client"]
    gate.enter(environ("203.0.113.2"))  # another client still may
    assert gate.open == 3


def test_a_full_process_gets_503_whoever_asks():
    gate = WaitGate(per_worker=1, per_client=5, proxies=PROXIES)
    gate.enter(environ("203.0.113.1"))
    with pytest.raises(TooManyWaits) as refused:
        gate.enter(environ("203.0.113.2"))
    assert (refused.value.status, refused.value.error, refused.value.limit) == (503, "server full", "waits_per_worker")


def test_release_gives_the_place_back_once_however_often_it_is_called():
    gate = WaitGate(per_worker=10, per_client=1, proxies=PROXIES)
    release = gate.enter(environ("203.0.113.1"))
    release()
    release()
    assert gate.open == 0
    gate.enter(environ("203.0.113.1"))
    assert gate.open == 1


def test_clients_are_counted_by_the_address_a_trusted_proxy_forwarded():
    gate = WaitGate(per_worker=10, per_client=1, proxies=PROXIES)
    gate.enter({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.1"})
    gate.enter({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.2"})
    with pytest.raises(TooManyWaits):
        gate.enter({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.1"})


def test_holding_releases_when_the_block_ends_even_by_an_error():
    gate = WaitGate(per_worker=10, per_client=1, proxies=PROXIES)
    with pytest.raises(RuntimeError), gate.holding(environ("203.0.113.1")):
        assert gate.open == 1
        raise RuntimeError("the wait failed")
    assert gate.open == 0


def test_held_releases_on_close_even_when_never_iterated():
    released = []

    def stream():
        yield b"data\n\n"

    body = Held(stream(), lambda: released.append(True))
    body.close()
    assert released == [True]


def request(query):
    return Request(EnvironBuilder(path="/changes", query_string=query).get_environ())


def new_cache(budget_bytes=1 << 20):
    schema = ChangesQuerySchema()
    return QueryCache(schema.load, schema.fields, budget_bytes)


def test_a_repeated_query_is_answered_from_the_cache():
    cache = new_cache()
    first = cache.get(request("slug=home&since=3"))
    assert first["slug"] == "home" and first["since"] == 3
    assert cache.get(request("slug=home&since=3")) is first


def test_junk_parameters_share_the_entry_of_the_parameters_that_count():
    cache = new_cache()
    first = cache.get(request("slug=home&since=3&junk=1"))
    assert cache.get(request("slug=home&since=3&junk=2")) is first
    assert cache.get(request("since=3&slug=home&slug=other")) is first  # a repeated parameter: its first value
    assert len(cache._entries) == 1


def test_a_bad_query_raises_and_is_not_kept():
    cache = new_cache()
    with pytest.raises(ValidationError):
        cache.get(request("slug=no spaces"))
    assert cache.size == 0


def test_the_oldest_used_entry_goes_first_when_the_budget_is_spent():
    cache = new_cache(budget_bytes=2 * (QueryCache.ENTRY_BYTES + 40))
    a = cache.get(request("slug=a"))
    cache.get(request("slug=b"))
    assert cache.get(request("slug=a")) is a  # a is now the most recently used
    cache.get(request("slug=c"))
    assert set(cache._entries) == {b"slug=a", b"slug=c"}
    assert cache.size <= cache.budget

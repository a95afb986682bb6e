"""Unit tests of changefeed/core/presence.py: a presence encoded once, a beat's user, and what a beat answers."""

import json
import time

import pytest

from changefeed.core.errors import ApiError
from changefeed.core.presence import NOBODY, Beat, Presence, beat_of, now_for, record, user_id
from changefeed.core.settings import DEFAULTS
from changefeed.security.tokens import AuthError, Rights

PRESENCE = Presence(7, count=2, editing=1, editors=(("a1", "Ada", "editing"), ("b2", "Bo <b>", "viewing")))


def test_a_user_id_is_short_stable_and_not_the_user():
    assert user_id("client:abcdefgh") == user_id("client:abcdefgh") != user_id("client:abcdefgi")
    assert len(user_id("sub:editor-1")) == 12 and "editor" not in user_id("sub:editor-1")


def test_a_user_id_takes_any_text_a_token_may_name():
    assert len(user_id("sub:\U0001f600 \u00e9")) == 12


def test_the_list_form_names_the_editors_and_the_count_form_does_not():
    assert json.loads(PRESENCE.text()) == {"version": 7, "count": 2, "editing": 1, "editors": [
        {"id": "a1", "name": "Ada", "state": "editing"}, {"id": "b2", "name": "Bo <b>", "state": "viewing"}]}
    assert json.loads(PRESENCE.text(count_only=True)) == {"version": 7, "count": 2, "editing": 1}


def test_a_presence_is_one_server_sent_event_without_an_id():
    assert PRESENCE.event == f"event: presence\ndata: {PRESENCE.body}\n\n".encode()
    assert PRESENCE.count_event == f"event: presence\ndata: {PRESENCE.count_body}\n\n".encode()


def test_nobody_is_version_zero_with_an_empty_list():
    assert json.loads(NOBODY.body) == {"version": 0, "count": 0, "editing": 0, "editors": []}


def item(name=None):
    return {"slug": "home", "client_id": "tab-0001", "name": name, "state": "viewing"}


def test_without_access_control_the_tab_is_its_own_user_under_the_name_it_chose():
    assert beat_of(item("Ada"), None, 40) == Beat("home", "tab-0001", "client:tab-0001", "Ada", "viewing")
    assert beat_of(item(), None, 40).name == "Guest"


def test_with_access_control_the_user_is_the_tokens_sub_whatever_name_is_sent():
    rights = Rights(sub="editor-with-a-long-name", read=("home",), write=(), expires_at=time.time() + 60)
    assert beat_of(item("Mallory"), rights, 6) == Beat("home", "tab-0001", "sub:editor-with-a-long-name",
                                                       "editor", "viewing")


def test_a_token_that_may_not_read_the_page_may_not_beat_on_it():
    rights = Rights(sub="editor-1", read=("docs-*",), write=(), expires_at=time.time() + 60)
    with pytest.raises(AuthError) as refused:
        beat_of(item(), rights, 40)
    assert refused.value.status == 403


@pytest.fixture
def store(make_store):
    return make_store()


def test_a_beat_answers_its_version_its_user_id_and_the_timings_to_keep(store):
    answer = record(store, Beat("home", "tab-0001", "client:tab-0001", "Ada", "viewing"), DEFAULTS)
    assert answer == {"slug": "home", "version": answer["version"], "you": user_id("client:tab-0001"),
                      "beat_ms": DEFAULTS["CHANGEFEED_PRESENCE_BEAT_MS"],
                      "ttl_ms": DEFAULTS["CHANGEFEED_PRESENCE_TTL_MS"],
                      "min_interval_ms": DEFAULTS["CHANGEFEED_PRESENCE_MIN_INTERVAL_MS"]}
    assert answer["version"] > 0


def test_a_beat_too_soon_is_a_429_saying_when_to_beat_again(store):
    beat = Beat("home", "tab-0001", "client:tab-0001", "Ada", "viewing")
    record(store, beat, DEFAULTS)
    with pytest.raises(ApiError) as refused:
        record(store, beat._replace(state="editing"), DEFAULTS)
    assert (refused.value.status, refused.value.details["limit"]) == (429, "presence_interval")
    assert 0 < refused.value.details["retry_after_ms"] <= DEFAULTS["CHANGEFEED_PRESENCE_MIN_INTERVAL_MS"]
    assert refused.value.details["headers"] == {"Retry-After": "1"}


def test_the_list_is_read_only_when_the_client_holds_another_version(store):
    version = record(store, Beat("home", "tab-0001", "client:tab-0001", "Ada", "editing"), DEFAULTS)["version"]
    assert now_for(store, "home", version) == Presence(version)  # unchanged: no names read
    present = now_for(store, "home", 0)
    assert (present.version, present.count, present.editing) == (version, 1, 1)
    assert present.editors == ((user_id("client:tab-0001"), "Ada", "editing"),)

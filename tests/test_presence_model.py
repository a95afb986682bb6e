"""changefeed.core.presence on its own: who a beat is from, what a presence looks like on the wire, what a beat answers.

test_presence.py drives presence through the service (POST /presence, the
feeds, expiry); these pin the model's own functions, with real Rights and a
real store where one is needed.
"""

import json
import time

import pytest

from changefeed.core.errors import ApiError
from changefeed.core.presence import NOBODY, Beat, Presence, beat_of, now_for, record, user_id
from changefeed.core.settings import DEFAULTS
from changefeed.security.tokens import AuthError, Rights

ITEM = {"slug": "home", "client_id": "tab-12345678", "name": "Ada", "state": "editing"}
SOMEONE = Presence(version=7, count=3, editing=1, editors=(("a1", "Zoë <b>", "editing"), ("b2", "Bob", "viewing")))


def rights(sub="editor-1", read=("*",)):
    return Rights(sub=sub, read=tuple(read), write=(), expires_at=time.time() + 300)


# Who a beat is from.

def test_without_access_control_the_tab_is_its_own_user_under_the_name_it_chose():
    assert beat_of(ITEM, None, 40) == Beat("home", "tab-12345678", "client:tab-12345678", "Ada", "editing")


def test_a_tab_that_chose_no_name_is_a_guest():
    assert beat_of({**ITEM, "name": None}, None, 40).name == "Guest"


def test_with_access_control_the_user_is_the_tokens_sub_whatever_name_is_sent():
    beat = beat_of({**ITEM, "name": "Someone Else"}, rights(sub="editor-1"), 40)
    assert (beat.user, beat.name, beat.client_id) == ("sub:editor-1", "editor-1", "tab-12345678")


def test_a_long_sub_is_shown_cut_to_the_longest_name_but_kept_whole_as_the_user():
    beat = beat_of(ITEM, rights(sub="x" * 100), 40)
    assert beat.name == "x" * 40 and beat.user == "sub:" + "x" * 100


def test_a_token_without_a_sub_beats_as_someone():
    assert beat_of(ITEM, rights(sub=None), 40).user == "sub:someone"


def test_a_token_that_may_not_read_the_page_may_not_beat_on_it():
    with pytest.raises(AuthError) as refused:
        beat_of(ITEM, rights(read=("docs-*",)), 40)
    assert refused.value.status == 403


# A user's public id.

def test_a_users_id_is_short_stable_and_says_nothing_of_the_client_id():
    ident = user_id("client:tab-12345678")
    assert ident == user_id("client:tab-12345678") and len(ident) == 12 and int(ident, 16) >= 0
    assert "tab-12345678" not in ident and ident != user_id("client:tab-87654321")


def test_a_users_id_can_be_made_even_from_a_lone_surrogate():
    """A sub is a token's claim: whatever it holds, the id of its user is still a hash (surrogatepass)."""
    assert len(user_id("sub:\ud800")) == 12


# What a presence looks like on the wire.

def test_the_list_form_names_each_user_with_their_id_and_state_as_sent():
    assert json.loads(SOMEONE.body) == {"version": 7, "count": 3, "editing": 1, "editors": [
        {"id": "a1", "name": "Zoë <b>", "state": "editing"}, {"id": "b2", "name": "Bob", "state": "viewing"}]}
    assert "Zoë <b>" in SOMEONE.body  # not escaped: the page shows names as text


def test_the_count_form_names_nobody():
    assert json.loads(SOMEONE.count_body) == {"version": 7, "count": 3, "editing": 1}
    assert SOMEONE.text(count_only=True) == SOMEONE.count_body and SOMEONE.text() == SOMEONE.body


def test_a_presence_event_carries_no_id_so_the_stream_resumes_by_page_version():
    assert SOMEONE.event == f"event: presence\ndata: {SOMEONE.body}\n\n".encode()
    assert SOMEONE.count_event == f"event: presence\ndata: {SOMEONE.count_body}\n\n".encode()
    assert b"\nid:" not in SOMEONE.event and not SOMEONE.event.startswith(b"id:")


def test_nobody_is_version_0_and_empty():
    assert json.loads(NOBODY.body) == {"version": 0, "count": 0, "editing": 0, "editors": []}


# What a beat answers, with a real store.

@pytest.fixture
def store(make_store):
    store = make_store()
    store.configure_presence(ttl_s=15.0, min_interval_s=1.0, max_per_page=1, list_max=50)
    return store


def test_a_recorded_beat_answers_its_version_its_id_and_the_pace_to_keep(store):
    beat = beat_of(ITEM, None, 40)
    answer = record(store, beat, DEFAULTS)
    assert answer == {"slug": "home", "version": answer["version"], "you": user_id(beat.user),
                      "beat_ms": DEFAULTS["CHANGEFEED_PRESENCE_BEAT_MS"], "ttl_ms": DEFAULTS["CHANGEFEED_PRESENCE_TTL_MS"],
                      "min_interval_ms": DEFAULTS["CHANGEFEED_PRESENCE_MIN_INTERVAL_MS"]}
    assert answer["version"] > 0


def test_a_beat_too_soon_is_a_429_saying_when_to_beat_again(store):
    record(store, beat_of(ITEM, None, 40), DEFAULTS)
    with pytest.raises(ApiError) as refused:
        record(store, beat_of(ITEM, None, 40), DEFAULTS)
    error = refused.value
    assert (error.status, error.details["limit"]) == (429, "presence_interval")
    assert 0 < error.details["retry_after_ms"] <= 1000 and error.details["headers"] == {"Retry-After": "1"}


def test_a_new_tab_on_a_full_page_is_a_429_saying_the_limit(store):
    record(store, beat_of(ITEM, None, 40), DEFAULTS)
    with pytest.raises(ApiError) as refused:
        record(store, beat_of({**ITEM, "client_id": "tab-87654321"}, None, 40), DEFAULTS)
    error = refused.value
    assert (error.status, error.details["limit"]) == (429, "presence_entries")
    assert "CHANGEFEED_PRESENCE_MAX_PER_PAGE" in error.message


def test_a_client_holding_the_current_version_gets_no_list_and_one_holding_another_gets_it(store):
    version = record(store, beat_of(ITEM, None, 40), DEFAULTS)["version"]
    assert now_for(store, "home", version) == Presence(version)
    listed = now_for(store, "home", version - 1)
    assert (listed.version, listed.count, listed.editing) == (version, 1, 1)
    assert listed.editors == ((user_id("client:tab-12345678"), "Ada", "editing"),)

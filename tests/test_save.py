"""POST /save: one row per slug, its version bumped by exactly 1 per save."""

import json
import re
import time

import pytest

from app import create_app
from support.servers import close_app

pytestmark = pytest.mark.engines

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_first_save_is_version_1_and_each_save_adds_exactly_1(save):
    answers = [save(html=f"<p>{n}</p>").get_json() for n in range(3)]
    assert [a["version"] for a in answers] == [1, 2, 3]
    assert all(a["slug"] == "home" for a in answers)


def test_save_answers_slug_version_iso_utc_milliseconds_and_epoch(save, epoch):
    response = save()
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"slug", "version", "updated_at", "epoch"}
    assert body["epoch"] == epoch
    assert ISO_MS.fullmatch(body["updated_at"]), body["updated_at"]


def test_slugs_are_case_insensitive_one_page(save, client):
    assert save(slug="Home").get_json()["slug"] == "home"
    assert save(slug="HOME").get_json()["version"] == 2
    assert client.get("/changes?slug=hOmE").get_json()["version"] == 2


def test_slugs_are_independent(save):
    save(slug="a"), save(slug="a")
    assert save(slug="b").get_json()["version"] == 1


def test_one_row_per_slug(save, database):
    for _ in range(5):
        save(slug="one")
    save(slug="two")
    rows = database.query("SELECT slug, version FROM page_versions ORDER BY slug")
    assert rows == [("one", 5), ("two", 1)]


def test_data_round_trips_as_the_json_value_saved(save, client):
    value = {"title": "Hé \u2603", "tags": ["a", "b"], "n": 1.5, "ok": True, "none": None,
             "nested": {"deep": [1, [2, [3]]]}}
    save(data=value)
    assert client.get("/changes?slug=home").get_json()["data"] == value


def test_data_may_be_any_json_value_and_defaults_to_null(client, save):
    for value in ["text", 42, [1, 2], None, False]:
        save(data=value)
        assert client.get("/changes?slug=home").get_json()["data"] == value
    client.post("/save", json={"slug": "nodata", "html": "x"})
    assert client.get("/changes?slug=nodata").get_json()["data"] is None


def test_form_body_works_like_json_with_data_as_json_text(client):
    response = client.post("/save", data={"slug": "form", "html": "<b>x</b>", "data": '{"a": [1]}'})
    assert response.status_code == 200, response.get_json()
    change = client.get("/changes?slug=form").get_json()
    assert (change["html"], change["data"]) == ("<b>x</b>", {"a": [1]})


def test_multipart_form_body_is_accepted(client):
    response = client.post("/save", data={"slug": "multi", "html": "x", "base_version": "0"},
                           content_type="multipart/form-data")
    assert response.get_json()["version"] == 1


def test_base_version_equal_to_stored_saves(save):
    save()
    assert save(base_version=1).get_json()["version"] == 2


def test_base_version_zero_creates_a_new_page_only(save):
    assert save(slug="fresh", base_version=0).get_json()["version"] == 1
    assert save(slug="fresh", base_version=0).status_code == 409


def test_stale_base_version_is_a_conflict_and_writes_nothing(save, client):
    save(html="theirs")
    save(html="theirs, again")
    response = save(html="mine", base_version=1)
    assert response.status_code == 409
    body = response.get_json()
    assert body["error"] == "conflict" and body["version"] == 2
    assert "base_version 2" in body["message"]
    change = client.get("/changes?slug=home").get_json()
    assert (change["version"], change["html"]) == (2, "theirs, again")


def test_html_and_data_are_stored_verbatim(save, client):
    html = "<script>alert(1)</script>\x01 \u2028 '\"\\ \U0001F600"
    save(html=html, data={"nul": "\x00", "text": "</script>"})
    change = client.get("/changes?slug=home").get_json()
    assert (change["html"], change["data"]) == (html, {"nul": "\x00", "text": "</script>"})


def test_html_with_a_nul_character_is_refused_and_nothing_is_written(save, client):
    response = save(html="a\x00b")
    assert response.status_code == 422
    assert "NUL" in response.get_json()["fields"]["html"][0]
    assert client.get("/changes?slug=home").get_json()["version"] == 0


def keyed(client, key, slug="home", html="<h1>Hi</h1>", **extra):
    return client.post("/save", json={"slug": slug, "html": html, **extra}, headers={"Idempotency-Key": key})


def test_a_retry_with_the_same_idempotency_key_gets_the_first_answer_and_saves_nothing(client):
    first = keyed(client, "8e03978e-40d5-43e8-bc93-6894a57f9324")
    again = keyed(client, "8e03978e-40d5-43e8-bc93-6894a57f9324")
    quoted = keyed(client, '"8e03978e-40d5-43e8-bc93-6894a57f9324"')  # the draft's structured string
    assert first.status_code == again.status_code == quoted.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == quoted.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == quoted.get_json() == first.get_json()
    assert client.get("/changes?slug=home").get_json()["version"] == 1
    assert keyed(client, "another-key").get_json()["version"] == 2


def test_an_idempotency_key_reused_for_another_request_is_refused_and_writes_nothing(client):
    keyed(client, "k-1", html="<p>first</p>")
    for other in [dict(html="<p>second</p>"), dict(slug="other"), dict(data={"a": 1}), dict(base_version=1)]:
        response = keyed(client, "k-1", **{"html": "<p>first</p>", **other})
        body = response.get_json()
        assert response.status_code == 422, body
        assert "Idempotency-Key" in body["fields"] and "a new key" in body["message"]
    assert client.get("/changes?slug=home").get_json()["version"] == 1
    assert client.get("/changes?slug=other").get_json()["version"] == 0


def test_an_idempotency_key_is_forgotten_after_its_window(database):
    client = create_app({**database.config, "CHANGEFEED_IDEMPOTENCY_TTL_S": 0.3}).test_client()
    assert keyed(client, "k").get_json()["version"] == 1
    assert keyed(client, "k").headers.get("Idempotent-Replayed") == "true"
    time.sleep(0.4)
    later = keyed(client, "k")
    assert later.get_json()["version"] == 2 and "Idempotent-Replayed" not in later.headers
    rows = database.query("SELECT count(*) FROM idempotency_keys")[0][0]
    assert rows == 1  # the expired one was deleted, not kept alongside
    close_app(client.application)


def test_a_refused_save_does_not_use_up_its_idempotency_key(client):
    keyed(client, "k-0", html="<p>v1</p>")
    stale = keyed(client, "k-1", html="<p>stale</p>", base_version=0)
    assert stale.status_code == 409
    assert keyed(client, "k-2", html="<p>v2</p>", base_version=1).get_json()["version"] == 2
    assert keyed(client, "k-1", html="<p>stale</p>", base_version=0).status_code == 409  # checked again


def deep(levels):
    """JSON text of `levels` nested arrays around 0."""
    return "[" * levels + "0" + "]" * levels


@pytest.mark.parametrize("kwargs", [
    {"data": '{"slug": "big", "html": "x", "data": {"n": 1e400}}', "content_type": "application/json"},
    {"data": '{"slug": "big", "html": "x", "data": [1, [-1e400]]}', "content_type": "application/json"},
    {"data": {"slug": "big", "html": "x", "data": '{"n": 1e400}'}},
], ids=["json", "json negative, nested", "form"])
def test_a_number_too_large_for_a_float_is_refused_on_data_and_nothing_is_stored(client, database, kwargs):
    """json.loads reads 1e400 as infinity, which json.dumps would store as the bare token Infinity: not JSON."""
    answer = client.post("/save", **kwargs)
    assert answer.status_code == 422 and list(answer.json["fields"]) == ["data"], answer.text
    assert "finite" in answer.json["fields"]["data"][0]
    assert database.query("SELECT count(*) FROM page_versions") == [(0,)]


@pytest.mark.parametrize("levels, form", [(65, False), (900, False), (65, True), (1000, True)],
                         ids=["json 65", "json 900", "form 65", "form 1000"])
def test_data_nested_past_64_levels_is_refused_naming_the_limit(client, database, levels, form):
    """Deep nesting once made a 500 (RecursionError in json.loads or json.dumps); now a 422 that says the limit."""
    if form:
        answer = client.post("/save", data={"slug": "deep", "html": "x", "data": deep(levels)})
    else:
        answer = client.post("/save", data=f'{{"slug": "deep", "html": "x", "data": {deep(levels)}}}',
                             content_type="application/json")
    assert answer.status_code == 422 and list(answer.json["fields"]) == ["data"], answer.text
    assert "64 levels" in answer.json["fields"]["data"][0]
    assert database.query("SELECT count(*) FROM page_versions") == [(0,)]


def test_data_64_levels_deep_is_stored_and_read_back(client):
    answer = client.post("/save", data=f'{{"slug": "deep", "html": "x", "data": {{"a": {deep(63)}}}}}',
                         content_type="application/json")
    assert answer.status_code == 200, answer.text
    assert client.get("/changes?slug=deep").json["data"] == {"a": json.loads(deep(63))}
    answer = client.post("/save", data=f'{{"slug": "deep", "html": "x", "data": {{"a": {deep(64)}}}}}',
                         content_type="application/json")
    assert answer.status_code == 422 and "64 levels" in answer.json["fields"]["data"][0]


def test_a_slug_with_the_kelvin_sign_is_refused_not_folded_to_k(client, database):
    """U+212A lowers to an ASCII k: the slug rule applies to the text as sent, before folding."""
    for slug in ("\u212a", "\u212aelvin", "\u0130d"):  # KELVIN SIGN; I WITH DOT ABOVE lowers to i + U+0307
        answer = client.post("/save", json={"slug": slug, "html": "x"})
        assert answer.status_code == 422 and list(answer.json["fields"]) == ["slug"], (slug, answer.text)
        assert client.get("/changes", query_string={"slug": slug}).status_code == 422
    assert database.query("SELECT count(*) FROM page_versions") == [(0,)]

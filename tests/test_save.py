"""POST /save: one row per slug, its version bumped by exactly 1 per save."""

import re
import sqlite3

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


def test_one_row_per_slug(save, db_path):
    for _ in range(5):
        save(slug="one")
    save(slug="two")
    rows = sqlite3.connect(db_path).execute(
        "SELECT slug, version FROM page_versions ORDER BY slug").fetchall()
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
    html = "<script>alert(1)</script>\x00 \u2028 '\"\\"
    save(html=html, data="</script>")
    change = client.get("/changes?slug=home").get_json()
    assert (change["html"], change["data"]) == (html, "</script>")

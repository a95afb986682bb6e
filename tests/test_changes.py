"""GET /changes: is anything newer than `since`, and if so, here it is."""

import sqlite3

import pytest

from changefeed.stores import schema as migrate

pytestmark = pytest.mark.engines


def test_unknown_slug_is_version_0_unchanged(client, epoch):
    response = client.get("/changes?slug=nobody&since=0")
    assert response.status_code == 200
    assert response.get_json() == {"changed": False, "version": 0, "epoch": epoch}


def test_since_defaults_to_0(client, save):
    save()
    assert client.get("/changes?slug=home").get_json()["changed"] is True


def test_version_at_or_below_since_is_unchanged(client, save, epoch):
    save(), save()
    unchanged = {"changed": False, "version": 2, "epoch": epoch}
    assert client.get("/changes?slug=home&since=2").get_json() == unchanged
    assert client.get("/changes?slug=home&since=7").get_json() == unchanged


def test_newer_version_returns_the_whole_page(client, save):
    saved = save(html="<p>one</p>", data={"k": 1}).get_json()
    save(html="<p>two</p>", data={"k": 2})
    body = client.get("/changes?slug=home&since=0").get_json()
    assert list(body) == ["changed", "version", "html", "data", "updated_at", "epoch"]
    assert body["changed"] is True and body["version"] == 2
    assert (body["html"], body["data"]) == ("<p>two</p>", {"k": 2})
    assert body["updated_at"] >= saved["updated_at"]


def test_slug_in_query_is_case_folded(client, save):
    save(slug="about")
    assert client.get("/changes?slug=About").get_json()["version"] == 1


def test_unknown_query_parameters_are_ignored(client):
    assert client.get("/changes?slug=x&cachebust=123").status_code == 200


def test_browsers_revalidate_and_shared_caches_keep_an_answer_one_second(client, save):
    save()
    for query in ("since=0", "since=1", "since=0&wait=5"):  # changed, unchanged poll, changed long-poll
        response = client.get(f"/changes?slug=home&{query}")
        assert response.headers["Cache-Control"] == "public, max-age=0, s-maxage=1"
        assert response.headers["ETag"].startswith('"') and "X-Accel-Expires" not in response.headers
        again = client.get(f"/changes?slug=home&{query}", headers={"If-None-Match": response.headers["ETag"]})
        assert again.status_code == 304 and again.headers["Cache-Control"] == response.headers["Cache-Control"]


def test_an_unchanged_long_poll_answer_is_kept_by_no_cache_but_nginx_for_its_second(client, save):
    save()
    response = client.get("/changes?slug=home&since=1&wait=1")
    assert response.get_json()["changed"] is False and response.headers["Cache-Control"] == "no-cache"
    names = [name for name, _ in response.headers]
    # Before Cache-Control: nginx 1.22 obeys whichever of the two it reads first.
    assert response.headers["X-Accel-Expires"] == "1" and names.index("X-Accel-Expires") < names.index("Cache-Control")


def test_matching_if_none_match_is_304_with_no_body(client, save):
    save()
    etag = client.get("/changes?slug=home&since=0").headers["ETag"]
    response = client.get("/changes?slug=home&since=0", headers={"If-None-Match": etag})
    assert response.status_code == 304
    assert response.data == b""
    assert response.headers["ETag"] == etag


def test_a_weak_or_listed_if_none_match_with_the_etag_is_304(client, save):
    """RFC 9110: If-None-Match compares weakly, and may list tags or be `*` (caches and proxies send these)."""
    save()
    etag = client.get("/changes?slug=home&since=0").headers["ETag"]
    for header in (f"W/{etag}", f'"other", W/{etag}', f'W/"other",{etag}', "*"):
        response = client.get("/changes?slug=home&since=0", headers={"If-None-Match": header})
        assert response.status_code == 304, header
        assert response.data == b"" and response.headers["ETag"] == etag
    for header in ('W/"other"', f'"other", W/"{etag[1:-1]}x"'):  # no tag of this answer: the answer itself
        assert client.get("/changes?slug=home&since=0", headers={"If-None-Match": header}).status_code == 200


def test_etag_changes_whenever_the_answer_does(client, save):
    def etag(since):
        return client.get(f"/changes?slug=home&since={since}").headers["ETag"]

    seen = {etag(0)}  # unknown slug
    save()
    seen |= {etag(0), etag(1)}  # changed / unchanged at version 1
    save()
    seen |= {etag(0), etag(2)}
    assert len(seen) == 5
    assert etag(0) == etag(1)  # both are "version 2, changed": one answer, one tag


def test_stale_etag_gets_the_new_answer(client, save):
    save()
    old = client.get("/changes?slug=home&since=1").headers["ETag"]
    save(html="new")
    response = client.get("/changes?slug=home&since=1", headers={"If-None-Match": old})
    assert response.status_code == 200
    assert response.get_json()["html"] == "new"


def test_a_since_of_another_epoch_gets_the_whole_state(client, save, epoch):
    save(html="<p>one</p>"), save(html="<p>two</p>")
    assert client.get(f"/changes?slug=home&since=2&epoch={epoch}").get_json()["changed"] is False
    body = client.get("/changes?slug=home&since=7&epoch=0123456789abcdef").get_json()
    assert body == {**body, "changed": True, "version": 2, "html": "<p>two</p>", "epoch": epoch}
    missing = client.get("/changes?slug=nothing&since=7&epoch=0123456789abcdef").get_json()
    assert missing == {"changed": False, "version": 0, "epoch": epoch}  # version 0 of this database


@pytest.mark.sqlite_only
def test_a_database_restored_in_place_answers_with_its_new_epoch_and_older_versions(client, save, db_path, epoch,
                                                                                      tmp_path):
    save(html="<p>v1</p>")
    backup = sqlite3.connect(str(tmp_path / "backup.sqlite3"))
    sqlite3.connect(db_path).backup(backup)
    save(html="<p>v2</p>"), save(html="<p>v3</p>")
    backup.backup(sqlite3.connect(db_path))  # the documented restore, then `migrate.py --new-epoch`
    new = migrate.new_epoch(db_path)
    body = client.get(f"/changes?slug=home&since=3&epoch={epoch}").get_json()
    assert body == {**body, "changed": True, "version": 1, "html": "<p>v1</p>", "epoch": new}
    later = save().get_json()
    assert (later["version"], later["epoch"]) == (2, new)

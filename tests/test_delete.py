"""Deleting a page: a tombstone one version up, which every transport reports, on SQLite and PostgreSQL.

Removing a page's row (what the docs once suggested) broke the feed twice:
the next save could reuse a `seq` the watchers had passed (it arrived only
at the next heartbeat), and a re-created page started again at version 1,
so a client holding version 3 was told "nothing changed". A tombstone keeps
the row, so neither can happen, and the database refuses the old way.
"""

import os
import subprocess
import sys
import time

import pytest
import requests

from app import create_app
from support import ROOT
from support.clients import GENEROUS_S, SECRET, Client, http_save, start_long_poll, token
from support.servers import close_app

pytestmark = pytest.mark.engines


def delete(client, slug="home", **fields):
    return client.post("/delete", json={"slug": slug, **fields})


def test_a_delete_is_a_tombstone_one_version_up_that_changes_reports(client, save, epoch):
    save(html="v1"), save(html="v2")
    answer = delete(client)
    assert answer.status_code == 200
    assert answer.json == {"slug": "home", "version": 3, "deleted": True,
                           "updated_at": answer.json["updated_at"], "epoch": epoch}
    seen = client.get("/changes?slug=home&since=2").json
    assert seen == {"changed": True, "version": 3, "html": "", "data": None, "deleted": True,
                    "updated_at": answer.json["updated_at"], "epoch": epoch}
    assert client.get("/changes?slug=home&since=0").json["deleted"] is True  # a newcomer learns it too
    assert client.get("/changes?slug=home&since=3").json == {"changed": False, "version": 3, "epoch": epoch}


def test_a_page_saved_again_after_a_delete_goes_on_from_the_tombstone_never_back_to_1(client, save):
    save(html="v1"), save(html="v2"), save(html="v3")
    delete(client)
    again = save(html="again")
    assert again.json["version"] == 5
    seen = client.get("/changes?slug=home&since=3").json  # a client that held version 3 is told
    assert (seen["changed"], seen["version"], seen["html"]) == (True, 5, "again")
    assert "deleted" not in seen


def test_creating_with_base_version_0_takes_the_place_of_a_tombstone(client, save):
    save(html="v1")
    delete(client)
    assert save(html="new", base_version=0).json["version"] == 3
    assert save(html="twice", base_version=0).status_code == 409  # the page exists again


def test_deleting_a_missing_or_deleted_page_is_404_and_writes_nothing(client, save, database):
    missing = delete(client, "nowhere")
    assert (missing.status_code, missing.json["error"], missing.json["version"]) == (404, "not found", 0)
    assert "never saved" in missing.json["message"]
    save(html="v1")
    delete(client)
    again = delete(client)
    assert (again.status_code, again.json["version"]) == (404, 2)
    assert "deleted already" in again.json["message"]
    assert database.query("SELECT slug, version FROM page_versions") == [("home", 2)]


def test_a_delete_from_a_stale_base_version_is_a_conflict_and_deletes_nothing(client, save):
    save(html="v1"), save(html="v2")
    stale = delete(client, base_version=1)
    assert (stale.status_code, stale.json["version"]) == (409, 2)
    assert client.get("/changes?slug=home&since=0").json["html"] == "v2"
    assert delete(client, base_version=2).json["version"] == 3


def test_a_delete_takes_form_fields_and_refuses_bad_input_with_the_field_named(client, save):
    save(html="v1")
    assert client.post("/delete", data={"slug": "HOME"}).json["version"] == 2
    bad = client.post("/delete", json={"slug": "no spaces"})
    assert bad.status_code == 422 and "slug" in bad.json["fields"]
    unknown = client.post("/delete", json={"slug": "home", "html": "x"})
    assert unknown.status_code == 422 and "html" in unknown.json["fields"]
    assert client.post("/delete", data="slug=home", content_type="text/plain").status_code == 415


def test_with_access_control_a_delete_needs_write_on_the_slug_and_is_refused_from_another_site(database):
    app = create_app({**database.config, "TESTING": True, "CHANGEFEED_JWT_SECRET": SECRET})
    try:
        client = app.test_client()
        writer = {"Authorization": f"Bearer {token(write=['docs-*'])}"}
        assert client.post("/save", json={"slug": "docs-a", "html": "x"}, headers=writer).status_code == 200
        assert client.post("/delete", json={"slug": "docs-a"}).status_code == 401
        reader = {"Authorization": f"Bearer {token(write=[])}"}
        assert client.post("/delete", json={"slug": "docs-a"}, headers=reader).status_code == 403
        cross = {**writer, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
        assert client.post("/delete", json={"slug": "docs-a"}, headers=cross).status_code == 403
        assert database.query("SELECT deleted FROM page_versions") in ([(0,)], [(False,)])  # nothing deleted
        assert client.post("/delete", json={"slug": "docs-a"}, headers=writer).json["version"] == 2
    finally:
        close_app(app)


def test_a_tombstone_frees_its_place_under_the_page_limit(database, make_store):
    store = make_store(max_pages=1)
    store.save("one", "x", "null")
    store.delete("one")
    assert store.save("two", "x", "null").version == 1  # the tombstone is no page
    from changefeed.core.outcomes import StorageFull

    with pytest.raises(StorageFull):
        store.save("one", "back", "null")  # re-creating it adds a page again: over the limit
    assert database.query("SELECT pages FROM storage") == [(1,)]


def test_the_database_refuses_removing_a_page_row(database, save):
    save(html="v1")
    with pytest.raises(Exception, match="POST /delete"):
        database.query("DELETE FROM page_versions WHERE slug = 'home'")
    assert database.query("SELECT version FROM page_versions") == [(1,)]


def test_the_flask_command_deletes_a_page_and_says_so(database, make_store):
    store = make_store()
    store.save("home", "v1", "null")
    env = {**os.environ, **database.config}
    command = [sys.executable, "-m", "flask", "--app", "app", "delete-page"]
    done = subprocess.run([*command, "Home"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "home: deleted at version 2" in done.stdout
    again = subprocess.run([*command, "home"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "deleted already at version 2" in again.stderr
    assert store.changes("home", 1).deleted


# Every transport tells its subscribers, at once (not at the next heartbeat).

SLOW_HEARTBEAT = {"CHANGEFEED_SSE_HEARTBEAT_MS": "30000"}  # a wake-up that only a heartbeat gives fails these


def http_delete(server, slug):
    response = requests.post(f"{server.url}/delete", json={"slug": slug}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def test_a_long_poll_hears_of_a_delete_and_of_the_next_save_at_once(make_server):
    server = make_server(env=SLOW_HEARTBEAT)
    http_save(server, slug="a"), http_save(server, slug="b")  # b holds the highest seq
    finish = start_long_poll(server, "b", 1, wait=20)
    time.sleep(0.3)
    deleted_at = time.monotonic()
    http_delete(server, "b")
    result = finish()
    assert (result["answer"]["version"], result["answer"]["deleted"]) == (2, True)
    assert result["done_at"] - deleted_at < GENEROUS_S
    # The save after the delete of the newest page: with a row removed it reused a seq the watcher had passed.
    finish = start_long_poll(server, "a", 1, wait=20)
    time.sleep(0.3)
    saved_at = time.monotonic()
    http_save(server, slug="a", html="after")
    result = finish()
    assert result["answer"]["version"] == 2 and result["done_at"] - saved_at < GENEROUS_S


def test_an_event_stream_gets_the_tombstone_then_the_page_again_one_version_up(make_server, open_stream, epoch):
    server = make_server(env=SLOW_HEARTBEAT)
    http_save(server, slug="live")
    stream = open_stream(f"{server.url}/events?slug=live&since=1")
    assert stream.next() == {"retry": "2000"}
    http_delete(server, "live")
    event = stream.next(timeout=GENEROUS_S)
    assert event["id"] == f"{epoch}:2"
    assert (event["data"]["deleted"], event["data"]["html"], event["data"]["data"]) == (True, "", None)
    http_save(server, slug="live", html="back")
    event = stream.next(timeout=GENEROUS_S)
    assert (event["id"], event["data"]["html"]) == (f"{epoch}:3", "back")
    assert "deleted" not in event["data"]


def test_a_websocket_gets_a_change_frame_saying_deleted(make_server):
    server = make_server(env=SLOW_HEARTBEAT)
    http_save(server, slug="live")
    ws = Client(server.url.replace("http", "ws", 1) + "/ws")
    try:
        ws.send(type="subscribe", slug="live", since=1)
        assert ws.next()["type"] == "subscribed"
        http_delete(server, "live")
        frame = ws.next(timeout=GENEROUS_S)
        assert (frame["type"], frame["slug"], frame["version"], frame["deleted"]) == ("change", "live", 2, True)
    finally:
        ws.close()

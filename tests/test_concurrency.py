"""Concurrent saves from separate processes never lose or duplicate a version."""

import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from support.clients import save_pages_over_http

pytestmark = pytest.mark.engines

PROCESSES, SAVES = 8, 25


def save_in_store(database, worker, saves):
    store = database.open_store()
    try:
        return [store.save("race", f"{worker}:{n}", "null").version for n in range(saves)]
    finally:
        store.close()


def run_in_processes(target, first_arg):
    context = multiprocessing.get_context("spawn")  # fresh interpreters, nothing shared
    with context.Pool(PROCESSES) as pool:
        results = pool.starmap(target, [(first_arg, worker, SAVES) for worker in range(PROCESSES)])
    return [version for versions in results for version in versions]


@pytest.mark.parametrize("args", [[], ["--preload"]], ids=["", "preload"])
def test_concurrent_saves_through_gunicorn_never_lose_or_duplicate_a_version(make_server, args):
    server = make_server(workers=4, args=args)
    saved = run_in_processes(save_pages_over_http, server.url)
    for slug in ("race-0", "race-1", "race-2"):
        versions = sorted(version for saved_slug, version in saved if saved_slug == slug)
        assert versions == list(range(1, len(versions) + 1)), slug
        assert requests.get(f"{server.url}/changes?slug={slug}", timeout=10).json()["version"] == len(versions)


def test_concurrent_saves_from_processes_sharing_the_database_are_serialized(database, make_store):
    versions = run_in_processes(save_in_store, database)
    assert sorted(versions) == list(range(1, PROCESSES * SAVES + 1))
    assert make_store().changes("race", 0).version == PROCESSES * SAVES


def claim(url, worker):
    response = requests.post(f"{url}/save", json={"slug": "claimed", "html": f"by {worker}", "base_version": 0},
                             timeout=30)
    return response.status_code, response.json()


def test_concurrent_saves_on_the_same_base_version_let_exactly_one_win(make_server):
    """Saves committed together still check their base_version one by one."""
    server = make_server(workers=2)
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        answers = pool.starmap(claim, [(server.url, worker) for worker in range(PROCESSES * 3)])
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] + [409] * (PROCESSES * 3 - 1)
    assert all(body["version"] == 1 for _, body in answers)
    winner = next(body for status, body in answers if status == 200)
    stored = requests.get(f"{server.url}/changes?slug=claimed", timeout=10).json()
    assert stored["version"] == 1 and stored["updated_at"] == winner["updated_at"]


def retry_with_key(url, worker):
    """The same save, sent again and again with one Idempotency-Key, each time on a new connection."""
    answers = []
    for _ in range(3):
        response = requests.post(f"{url}/save", json={"slug": "once", "html": "<p>the one save</p>"},
                                 headers={"Idempotency-Key": "the-one-save"}, timeout=30)
        answers.append((response.status_code, response.json(), response.headers.get("Idempotent-Replayed")))
    return answers


def test_retries_of_one_idempotency_key_across_workers_create_exactly_one_version(make_server):
    server = make_server(workers=4)
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        answers = [a for worker in pool.starmap(retry_with_key, [(server.url, w) for w in range(PROCESSES)])
                   for a in worker]
    assert {status for status, _, _ in answers} == {200}
    assert {(body["version"], body["updated_at"]) for _, body, _ in answers} == {(1, answers[0][1]["updated_at"])}
    assert sorted(replayed or "" for _, _, replayed in answers) == [""] + ["true"] * (len(answers) - 1)
    assert requests.get(f"{server.url}/changes?slug=once", timeout=10).json()["version"] == 1


def test_retries_of_one_idempotency_key_let_go_together_create_exactly_one_version(database, make_store):
    """Two retries, each from a store of its own, wait behind another writer and then go at once."""
    release = database.hold_writes()
    with ThreadPoolExecutor(2) as pool:
        retries = [pool.submit(lambda: make_store().save("once", "<p>the one save</p>", "null", key="the-one-save"))
                   for _ in range(2)]
        time.sleep(0.3)  # both are waiting now
        release()
        answers = [retry.result(timeout=10) for retry in retries]
    assert sorted(answer.replayed for answer in answers) == [False, True]
    assert {(answer.version, answer.updated_at) for answer in answers} == {(1, answers[0].updated_at)}
    assert database.query("SELECT version FROM page_versions") == [(1,)]

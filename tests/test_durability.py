"""A save that was acknowledged survives kill -9 of the server."""

import threading
import time

import requests


def test_acknowledged_saves_survive_kill_9(make_server):
    server = make_server(workers=2)
    session = requests.Session()
    acknowledged = {}
    for n in range(50):
        slug = f"page-{n % 5}"
        response = session.post(f"{server.url}/save",
                                json={"slug": slug, "html": f"<p>{n}</p>", "data": {"n": n}}, timeout=10)
        assert response.status_code == 200
        acknowledged[slug] = (response.json()["version"], f"<p>{n}</p>", {"n": n})
    session.close()

    server.kill()
    server.start()

    for slug, (version, html, data) in acknowledged.items():
        change = requests.get(f"{server.url}/changes?slug={slug}&since=0", timeout=10).json()
        assert (change["version"], change["html"], change["data"]) == (version, html, data)
    next_save = requests.post(f"{server.url}/save", json={"slug": "page-0", "html": "after"}, timeout=10)
    assert next_save.json()["version"] == acknowledged["page-0"][0] + 1


def test_kill_9_in_the_middle_of_saves_keeps_every_acknowledged_one(make_server):

    server = make_server(workers=2)
    acknowledged = []

    def keep_saving():
        session = requests.Session()
        while True:
            try:
                response = session.post(f"{server.url}/save", json={"slug": "busy", "html": "x"}, timeout=5)
            except requests.RequestException:
                return  # the server is gone: this save was never acknowledged
            acknowledged.append(response.json()["version"])

    writers = [threading.Thread(target=keep_saving) for _ in range(4)]
    for writer in writers:
        writer.start()
    time.sleep(0.5)
    server.kill()
    for writer in writers:
        writer.join(timeout=10)

    assert len(acknowledged) > 10
    server.start()
    stored = requests.get(f"{server.url}/changes?slug=busy&since=0", timeout=10).json()["version"]
    assert stored >= max(acknowledged)
    assert stored <= len(acknowledged) + len(writers)  # at most the in-flight saves beyond those acknowledged

"""The Python client's command line (`python -m changefeed_client`) against the service under gunicorn.

Each command runs as a reader would run it, in a process of its own: a save
prints its receipt and is stored, errors exit 1 saying why on stderr, and
`watch` and `feed` print one JSON line per item as saves happen (read here
with a timeout, then stopped).
"""

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from support.clients import SECRET, http_save, token
from support.servers import Server

WAIT_S = 30  # generous: a line comes within a second; this only catches one that never does


def cli_env(**extra: str) -> dict[str, str]:
    """The tests' environment without a service address or token of the reader's own, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in ("CHANGEFEED_URL", "CHANGEFEED_TOKEN")}
    return {**env, **extra}


def cli(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m changefeed_client ARGS` to its end."""
    return subprocess.run([sys.executable, "-m", "changefeed_client", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=cli_env() if env is None else env, cwd=cwd)


def stored(server: Server, slug: str) -> dict[str, Any]:
    """The page as the service holds it now (`version` 0: none)."""
    answer: dict[str, Any] = requests.get(f"{server.url}/changes?slug={slug}&since=0", timeout=10).json()
    return answer


class Lines:
    """A command that runs until stopped (`watch`, `feed`): its JSON lines, read as they come."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "changefeed_client", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=cli_env())
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.errors: str | None = None  # its stderr, once stopped

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)  # it ended

    def next(self, timeout: float = WAIT_S) -> dict[str, Any]:
        """The next line, as JSON; fail if none comes within `timeout` seconds or the command ended."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s") from None
        assert line is not None, f"the command ended: {self.stderr()}"
        item: dict[str, Any] = json.loads(line)
        return item

    def until(self, slug: str, version: int) -> list[dict[str, Any]]:
        """Every line up to and including the one of `slug` at `version`."""
        got = [self.next()]
        while (got[-1].get("slug"), got[-1].get("version")) != (slug, version):
            got.append(self.next())
        return got

    def nothing_more(self, within: float = 1.0) -> None:
        """No further line comes within `within` seconds."""
        try:
            line = self.lines.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"one line too many: {line!r}")

    def stderr(self) -> str:
        self.stop()
        return self.errors or ""

    def stop(self) -> None:
        """End the command (SIGTERM, as `timeout` would), keep its stderr, and close its pipes."""
        if self.errors is not None:
            return
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)
        self.reader.join(timeout=30)
        assert self.process.stdout is not None and self.process.stderr is not None
        self.errors = self.process.stderr.read()
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def run_lines(server: Server) -> Iterator[Any]:
    """Start `python -m changefeed_client --url <server> ARGS` commands that run on; stopped after the test."""
    started: list[Lines] = []

    def run_lines(*args: str) -> Lines:
        started.append(Lines("--url", server.url, *args))
        return started[-1]

    yield run_lines
    for lines in started:
        lines.stop()


# save

def test_save_reads_the_html_from_a_file_and_prints_the_new_version(server: Server, tmp_path: Path) -> None:
    page = tmp_path / "home.html"
    page.write_text("<h1>From a file</h1>\n<p>é</p>\n", encoding="utf-8")
    result = cli("--url", server.url, "save", "home", str(page))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert result.stdout.count("\n") == 1  # one JSON line
    assert (printed["slug"], printed["version"], printed["replayed"]) == ("home", 1, False)
    assert printed["epoch"] == stored(server, "home")["epoch"]
    assert stored(server, "home")["html"] == "<h1>From a file</h1>\n<p>é</p>\n"


def test_save_reads_the_html_from_standard_input_given_as_a_dash(server: Server) -> None:
    http_save(server, "home", "<p>one</p>")
    result = cli("--url", server.url, "save", "home", "-", stdin="<p>two, from stdin</p>")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == 2
    page = stored(server, "home")
    assert (page["version"], page["html"], page["data"]) == (2, "<p>two, from stdin</p>", None)


def test_data_is_stored_as_the_json_value_given(server: Server) -> None:
    result = cli("--url", server.url, "save", "home", "-", "--data", '{"title": "Hi", "tags": [1, 2.5, null]}',
                 stdin="<h1>Hi</h1>")
    assert result.returncode == 0, result.stderr
    assert stored(server, "home")["data"] == {"title": "Hi", "tags": [1, 2.5, None]}


def test_an_invalid_field_exits_1_naming_it_on_stderr_and_stores_nothing(server: Server) -> None:
    result = cli("--url", server.url, "save", "Not a slug!", "-", stdin="<p>x</p>")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("changefeed: 422 invalid request"), result.stderr
    assert '{"slug": [' in result.stderr  # the field, with its reasons
    assert requests.get(f"{server.url}/feed?since=0", timeout=10).json()["changes"] == []


def test_a_stale_base_version_exits_1_saying_conflict_and_stores_nothing(server: Server) -> None:
    http_save(server, "home", "<p>one</p>")
    http_save(server, "home", "<p>two</p>")
    result = cli("--url", server.url, "save", "home", "-", "--base-version", "1", stdin="<p>stale</p>")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("changefeed: 409 conflict"), result.stderr
    assert "version 2" in result.stderr
    assert (stored(server, "home")["version"], stored(server, "home")["html"]) == (2, "<p>two</p>")
    fresh = cli("--url", server.url, "save", "home", "-", "--base-version", "2", stdin="<p>three</p>")
    assert fresh.returncode == 0 and json.loads(fresh.stdout)["version"] == 3, fresh.stderr


def test_the_url_and_token_come_from_the_environment(make_server: Any) -> None:
    """With access control on, no token is an auth error; CHANGEFEED_TOKEN saves; CHANGEFEED_URL names the service."""
    server = make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1"})
    reads = {"Authorization": f"Bearer {token()}"}
    nobody = cli("save", "docs-a", "-", stdin="<p>a</p>", env=cli_env(CHANGEFEED_URL=server.url))
    assert nobody.returncode == 1
    assert nobody.stderr.startswith("changefeed: 401 invalid token"), nobody.stderr
    narrow = cli("save", "blog-a", "-", stdin="<p>a</p>",
                 env=cli_env(CHANGEFEED_URL=server.url, CHANGEFEED_TOKEN=token(write=["docs-*"])))
    assert narrow.returncode == 1
    assert narrow.stderr.startswith("changefeed: 403 insufficient scope"), narrow.stderr
    changes = requests.get(f"{server.url}/feed?since=0", headers=reads, timeout=10).json()["changes"]
    assert changes == []  # neither was stored
    allowed = cli("save", "docs-a", "-", stdin="<p>a</p>",
                  env=cli_env(CHANGEFEED_URL=server.url, CHANGEFEED_TOKEN=token(write=["docs-*"])))
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["version"] == 1
    page = requests.get(f"{server.url}/changes?slug=docs-a&since=0", headers=reads, timeout=10).json()
    assert (page["version"], page["html"]) == (1, "<p>a</p>")


# watch

def test_watch_prints_one_json_line_per_version_as_saves_happen(server: Server, run_lines: Any) -> None:
    http_save(server, "home", "<p>v1</p>")
    watch = run_lines("watch", "home")
    first = watch.next()
    assert (first["slug"], first["version"], first["html"], first["deleted"]) == ("home", 1, "<p>v1</p>", False)
    for version in (2, 3):
        http_save(server, "home", f"<p>v{version}</p>", data={"n": version})
        line = watch.next()
        assert (line["version"], line["html"], line["data"]) == (version, f"<p>v{version}</p>", {"n": version})
        assert line["epoch"] == first["epoch"]
    http_save(server, "other", "<p>not followed</p>")
    watch.nothing_more()


def test_watch_of_a_prefix_shows_the_pages_under_it_and_never_one_outside(server: Server, run_lines: Any) -> None:
    http_save(server, "docs-a", "<p>a</p>")
    http_save(server, "blog-a", "<p>outside</p>")
    watch = run_lines("watch", "--prefix", "docs-")
    assert [(line["slug"], line["version"]) for line in watch.until("docs-a", 1)] == [("docs-a", 1)]
    http_save(server, "docs-b", "<p>b</p>")
    http_save(server, "blog-a", "<p>outside again</p>")
    http_save(server, "doc", "<p>a prefix of the prefix</p>")
    http_save(server, "docs-a", "<p>a again</p>")  # saved last: anything outside would have come before it
    lines = watch.until("docs-a", 2)
    assert [(line["slug"], line["version"]) for line in lines] == [("docs-b", 1), ("docs-a", 2)]
    assert lines[-1]["html"] == "<p>a again</p>"


# feed

def test_feed_prints_changes_with_a_cursor_and_since_resumes_after_it(server: Server, run_lines: Any) -> None:
    for slug in ("a", "b", "c"):
        http_save(server, slug, f"<p>{slug}</p>")
    feed = run_lines("feed")
    changes = [feed.next() for _ in range(3)]
    assert [(c["slug"], c["version"]) for c in changes] == [("a", 1), ("b", 1), ("c", 1)]
    assert all(c["cursor"].startswith(c["epoch"] + ".") for c in changes), changes
    assert len({c["cursor"] for c in changes}) == 3
    assert all(c["html"] is None for c in changes)  # without --full: which version, not the page
    feed.stop()
    resumed = run_lines("feed", "--since", changes[1]["cursor"])  # handled a and b: go on after b
    assert (resumed.next()["slug"]) == "c"
    http_save(server, "a", "<p>a, saved again</p>")
    again = resumed.next()
    assert (again["slug"], again["version"]) == ("a", 2)
    resumed.nothing_more()


def test_feed_full_adds_each_pages_html_and_data_and_prefix_keeps_its_pages(server: Server, run_lines: Any) -> None:
    http_save(server, "docs-a", "<h1>A</h1>", data={"k": 1})
    http_save(server, "blog-a", "<p>outside</p>")
    feed = run_lines("feed", "--full", "--prefix", "docs-")
    line = feed.next()
    assert (line["slug"], line["html"], line["data"]) == ("docs-a", "<h1>A</h1>", {"k": 1})
    feed.nothing_more()


def test_a_file_that_cannot_be_read_or_data_that_is_not_json_exits_1_saying_so_and_saves_nothing(server, tmp_path):
    url = ["--url", server.url]
    missing = cli(*url, "save", "home", str(tmp_path / "nowhere.html"))
    (tmp_path / "page.html").write_text("<p>x</p>")
    bad_data = cli(*url, "save", "home", str(tmp_path / "page.html"), "--data", "{not json")
    assert (missing.returncode, bad_data.returncode) == (1, 1)
    assert "cannot read" in missing.stderr and "Traceback" not in missing.stderr
    assert "--data is not JSON" in bad_data.stderr and "Traceback" not in bad_data.stderr
    assert stored(server, "home")["version"] == 0


def test_watch_takes_a_slug_or_a_prefix_not_both_nor_neither(server):
    both = cli("--url", server.url, "watch", "home", "--prefix", "docs-")
    neither = cli("--url", server.url, "watch")
    assert (both.returncode, neither.returncode) == (1, 1)
    assert "one of them" in both.stderr and "one of them" in neither.stderr

"""The production and development commands work from requirements.txt alone, and `pip install .` embeds.

The test virtualenv holds pytest, Playwright and their dependencies, which
hide a runtime dependency that requirements.txt forgets (gunicorn's gevent
workers import `packaging`, which only the test tools pulled in). So these
tests build a second virtualenv from requirements.txt and nothing else, and
run the service from it. It is cached by the hash of requirements.txt, so
only a change of that file pays for a new install. A later test installs
the package itself with `pip install .` into a fresh virtualenv and runs the
example host app (examples/host.py) from a folder outside the repository;
the last ones install the Python client alone (`pip install ./client`) into
another, and run the first example of its manual (docs/client.md) from
outside the repository against the service.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from changefeed.stores.schema import migrate
from support import ROOT
from support.docs import python_blocks, run_script
from support.servers import free_port

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "changefeed" / "clean-venvs"


@pytest.fixture(scope="module")
def clean_venv():
    """A virtualenv with exactly requirements.txt installed; return its bin folder."""
    requirements = (ROOT / "requirements.txt").read_bytes()
    venv = CACHE / hashlib.sha256(requirements + sys.version.encode()).hexdigest()[:16]
    if not (venv / "installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                                 "--disable-pip-version-check", "-r", str(ROOT / "requirements.txt")],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"pip install -r requirements.txt failed:\n{result.stderr[-3000:]}"
        (venv / "installed").touch()
    return venv / "bin"


def clean_env(bin_dir, **extra):
    """The environment of a shell that activated only the clean virtualenv."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not key.startswith("PYTEST")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(bin_dir.parent),
            **extra}


@contextmanager
def serving(command, env, url, log_path):
    """Run the server `command` from the repository until the block ends; enter once `url` answers."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"{command[0]} exited:\n{Path(log_path).read_text()[-3000:]}"
            try:
                requests.get(f"{url}/healthz", timeout=1)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, f"no answer in 30 s:\n{Path(log_path).read_text()[-3000:]}"
                time.sleep(0.1)
        yield
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def serve_and_check(command, env, url, log_path):
    """Start `command`, then save and receive the save as a Server-Sent Event; stop it."""
    with serving(command, env, url, log_path):
        with requests.get(f"{url}/events?slug=fresh&since=0", stream=True, timeout=10) as stream:
            assert stream.status_code == 200
            saved = requests.post(f"{url}/save", json={"slug": "fresh", "html": "<p>from a clean install</p>"},
                                  timeout=10)
            assert saved.status_code == 200 and saved.json()["version"] == 1, saved.text
            lines = stream.iter_lines(decode_unicode=True)
            data = next(line for line in lines if line.startswith("data: "))
            assert '"html":"<p>from a clean install</p>"' in data


def test_the_production_command_runs_from_requirements_txt_alone(clean_venv, tmp_path):
    db = str(tmp_path / "changefeed.sqlite3")
    port = free_port()
    env = clean_env(clean_venv, CHANGEFEED_DB=db, CHANGEFEED_BIND=f"127.0.0.1:{port}", CHANGEFEED_WORKERS="2")
    subprocess.run([str(clean_venv / "python"), "migrate.py"], cwd=ROOT, env=env, check=True, capture_output=True)
    serve_and_check([str(clean_venv / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"], env,
                    f"http://127.0.0.1:{port}", tmp_path / "gunicorn.log")


def test_flask_run_works_from_requirements_txt_alone(clean_venv, tmp_path):
    db = str(tmp_path / "changefeed.sqlite3")
    migrate(db)
    port = free_port()
    env = clean_env(clean_venv, CHANGEFEED_DB=db)
    serve_and_check([str(clean_venv / "flask"), "--app", "app", "run", "--host", "127.0.0.1", "--port", str(port)],
                    env, f"http://127.0.0.1:{port}", tmp_path / "flask.log")


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
    """A fresh virtualenv where `pip install .` installed the package and its pinned dependencies; its bin."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             str(ROOT)], capture_output=True, text=True, cwd=venv.parent)
    assert result.returncode == 0, f"pip install . failed:\n{result.stderr[-3000:]}"
    return venv / "bin"


def test_pip_install_then_the_example_host_app_works_from_outside_the_repository(installed_venv, tmp_path):
    """The example host app, copied away from the repository, embeds the installed package under /feed."""
    outside = tmp_path / "host"
    outside.mkdir()
    shutil.copy(ROOT / "examples" / "host.py", outside / "host.py")
    env = clean_env(installed_venv, CHANGEFEED_DB=str(outside / "host.db"))
    where = subprocess.run([str(installed_venv / "python"), "-c", "import changefeed; print(changefeed.__file__)"],
                           cwd=outside, env=env, capture_output=True, text=True, check=True).stdout
    assert str(installed_venv.parent) in where and str(ROOT) not in where, where
    migrated = subprocess.run([str(installed_venv / "flask"), "--app", "host", "changefeed", "migrate"],
                              cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "host.log", "wb") as log:
        process = subprocess.Popen([str(installed_venv / "flask"), "--app", "host", "run", "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=outside, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "host.log").read_text()[-3000:]
            try:
                home = requests.get(url, timeout=1)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, (tmp_path / "host.log").read_text()[-3000:]
                time.sleep(0.1)
        assert "The host app" in home.text
        with requests.get(f"{url}/feed/events?slug=home&since=0", stream=True, timeout=10) as stream:
            published = requests.post(f"{url}/publish/home", data={"html": "<h1>Hi</h1>"}, timeout=10)
            assert published.json() == {"slug": "home", "version": 1}, published.text
            data = next(line for line in stream.iter_lines(decode_unicode=True) if line.startswith("data: "))
            assert '"version":1' in data and '"html":"<h1>Hi</h1>"' in data, data
        saved = requests.post(f"{url}/feed/save", json={"slug": "home", "html": "<h1>Again</h1>"}, timeout=10)
        assert saved.json()["version"] == 2, saved.text
        changes = requests.get(f"{url}/feed/changes?slug=home&since=1", timeout=10).json()
        assert changes["version"] == 2 and changes["html"] == "<h1>Again</h1>"
        demo = requests.get(f"{url}/feed/?slug=home", timeout=10)
        assert demo.status_code == 200 and "/feed/static/" in demo.text, demo.text[:500]
        script = re.search(r'src="(/feed/static/[^"]+\.js)[^"]*"', demo.text)
        assert script and requests.get(url + script.group(1), timeout=10).status_code == 200
        assert requests.get(f"{url}/changes?slug=home&since=0", timeout=10).status_code == 404
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    """A fresh virtualenv where `pip install ./client` (as docs/client.md says) installed the client alone; its bin."""
    venv = tmp_path_factory.mktemp("client") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             "./client"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, f"pip install ./client failed:\n{result.stderr[-3000:]}"
    return venv / "bin"


def test_pip_install_client_then_the_first_example_of_its_manual_runs_from_outside_the_repository(
        client_venv, clean_venv, tmp_path):
    """The manual's first example (save, then watch), copied away from the repository, against gunicorn."""
    outside = tmp_path / "program"
    outside.mkdir()
    env = clean_env(client_venv)
    where = subprocess.run([str(client_venv / "python"), "-c",
                            "import changefeed_client; print(changefeed_client.__file__)"],
                           cwd=outside, env=env, capture_output=True, text=True, check=True).stdout
    assert str(client_venv.parent) in where and str(ROOT) not in where, where
    db = str(tmp_path / "changefeed.sqlite3")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = clean_env(clean_venv, CHANGEFEED_DB=db, CHANGEFEED_BIND=f"127.0.0.1:{port}", CHANGEFEED_WORKERS="2")
    subprocess.run([str(clean_venv / "python"), "migrate.py"], cwd=ROOT, env=server_env, check=True,
                   capture_output=True)
    first = python_blocks(ROOT / "docs" / "client.md")[0]
    assert "feed.save(" in first.source and "feed.watch(" in first.source, "the first example should save and watch"
    with serving([str(clean_venv / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"], server_env, url,
                 tmp_path / "gunicorn.log"):
        printed = run_script(first, url, outside, timeout=60, python=str(client_venv / "python"), env=env)
        stored = requests.get(f"{url}/changes?slug=home&since=0", timeout=10).json()
    assert printed == "saved version 1\n1 <h1>Hello</h1> {'title': 'Hello'}\n"
    assert printed == first.prints  # what the manual shows under it
    assert (stored["version"], stored["html"], stored["data"]) == (1, "<h1>Hello</h1>", {"title": "Hello"})


def test_the_installed_client_has_its_command_line_and_not_the_server(client_venv, tmp_path):
    """`pip install ./client` brings the command line, and neither Flask nor the service: the client needs no server."""
    env = clean_env(client_venv)
    for command in ([str(client_venv / "python"), "-m", "changefeed_client", "--help"],
                    [str(client_venv / "changefeed-client"), "--help"]):
        shown = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert all(word in shown.stdout for word in ("save", "watch", "feed", "--url", "--token")), shown.stdout
    for module in ("flask", "changefeed", "gunicorn"):
        imported = subprocess.run([str(client_venv / "python"), "-c", f"import {module}"], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=60)
        assert imported.returncode == 1 and f"No module named '{module}'" in imported.stderr, (module, imported.stderr)

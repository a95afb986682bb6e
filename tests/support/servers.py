"""The service as it really runs: under gunicorn or werkzeug on a free loopback port, and nginx in front of it."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in requirements-dev
import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server as make_werkzeug_server

from support import ROOT
from support.databases import Database


def free_port() -> int:
    """Ask the OS for a loopback port nobody is using."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def close_app(app: Flask) -> None:
    """Let go of what an app holds: its watcher or listener, and its database connections."""
    app.extensions["changefeed.notifier"].close()
    app.extensions["changefeed.store"].close()


class Server:
    """The service under gunicorn, as production runs it, on a free loopback port."""

    def __init__(self, database: Database, log_path: str, workers: int = 2, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = (), app: str = "app:create_app()") -> None:
        self.database, self.log_path, self.workers, self.args = database, log_path, workers, list(args)
        self.db_path = database.path
        self.app = app  # what gunicorn serves: the service, or a test's app built on it
        self.env = {**os.environ, **database.config, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "Server":
        """Start gunicorn and wait until it answers."""
        log = open(self.log_path, "ab")
        self.process = process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
             "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.workers),
             *self.args, self.app],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so kill() reaches every worker
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log()[-2000:]}")
            try:
                requests.get(f"{self.url}/changes?slug=ready", timeout=1)
                return self
            except requests.RequestException:  # not listening yet, or still booting
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer in 20 s: {self.log()[-2000:]}")

    def log(self) -> str:
        """Return what gunicorn wrote so far."""
        return Path(self.log_path).read_text()

    def send_signal(self, sig: int) -> None:
        """Send `sig` to gunicorn and all its workers, as `kill` from a shell would."""
        assert self.process is not None, "the server is not running"
        os.killpg(self.process.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to gunicorn and all its workers, and wait for them to end."""
        if self.process and self.process.poll() is None:
            self.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def kill(self) -> None:
        """End the server as a crash would: SIGKILL to master and workers, no clean-up."""
        self.stop(signal.SIGKILL)


def streams_per_worker(server: Server) -> list[int]:
    """How many client connections each gunicorn worker holds open right now."""
    assert server.process is not None, "the server is not running"
    workers = psutil.Process(server.process.pid).children()
    return [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port for c in w.net_connections("tcp"))
            for w in workers]  # not its connections to PostgreSQL


@contextmanager
def development_server(app: Flask) -> Iterator[str]:
    """Serve `app` as `flask run` does (werkzeug's server: threads, no gevent) on a free port; yield its URL."""
    port = free_port()
    httpd = make_werkzeug_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        httpd.shutdown()
        thread.join(timeout=10)


def find_program(program: str, package: str, tests: str) -> str:
    """Return the path of `program`; skip the caller (or fail, with CHANGEFEED_REQUIRE_<PACKAGE>=1) without it."""
    path = shutil.which(program) or next((p for p in (f"/usr/sbin/{program}",) if os.path.exists(p)), None)
    if path is None:
        reason = f"the {tests} tests need {tests}: apt-get install {package}"
        variable = f"CHANGEFEED_REQUIRE_{package.upper()}"
        if os.environ.get(variable) == "1":
            pytest.fail(f"{reason}; {variable}=1 makes this a failure", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return path


def find_nginx() -> str:
    return find_program("nginx", "nginx", "nginx")


@contextmanager
def running_nginx(http_block: str, folder: str | Path, ports: Sequence[int]) -> Iterator["subprocess.Popen[bytes]"]:
    """Run nginx with `http_block` as its http {} content, its files in `folder`, until the block ends.

    Ready once each of `ports` accepts connections. Its workers run as this
    user (as root: root), so they can write the test's folders (a cache).
    """
    temp = Path(folder) / "nginx-temp"
    temp.mkdir()
    conf = Path(folder) / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 1;
user {pwd.getpwuid(os.geteuid()).pw_name};
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
{http_block}
}}
""")
    process = subprocess.Popen([find_nginx(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        for port in ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    log = Path(folder) / "nginx-error.log"
                    assert process.poll() is None and time.monotonic() < deadline, log.exists() and log.read_text()
                    time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def find_varnish() -> str:
    return find_program("varnishd", "varnish", "Varnish")


@contextmanager
def running_varnish(vcl: str, folder: str | Path, port: int) -> Iterator["subprocess.Popen[bytes]"]:
    """Run varnishd in the foreground with `vcl`, listening on 127.0.0.1:`port`, until the block ends.

    Its working files go under `folder`; it runs as this user (`-j none`),
    with a small in-memory cache, and no management port.
    """
    path = Path(folder) / "varnish.vcl"
    path.write_text(vcl)
    log = open(Path(folder) / "varnish.log", "wb")
    process = subprocess.Popen([find_varnish(), "-F", "-j", "none", "-a", f"127.0.0.1:{port}", "-f", str(path),
                                "-n", str(Path(folder) / "varnish-work"), "-s", "malloc,64m", "-T", "none"],
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                text = (Path(folder) / "varnish.log").read_text()
                assert process.poll() is None and time.monotonic() < deadline, f"varnishd did not start:\n{text}"
                time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)

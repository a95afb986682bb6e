"""What the bench runs and watches: the service, the baseline, nginx, and their CPU and memory."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A server process tree started by the bench; stopped (all of it) on exit."""

    def __init__(self, argv, ready_path, env=None, cwd=ROOT, log=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env = {**os.environ, **(env or {})}
        self.env = {k: v.replace("{port}", str(self.port)) for k, v in self.env.items()}
        self.ready_path, self.cwd, self.log = ready_path, cwd, log
        self.process = None
        self.remove_after = []  # folders to delete when the process is gone

    def __enter__(self):
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        if self.log:
            out.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited at start; see {self.log}")
            try:
                urllib.request.urlopen(self.url + self.ready_path, timeout=1).read()
                time.sleep(0.5)  # let every worker finish booting
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.argv} did not answer in 30 s")

    def __exit__(self, *exc):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for folder in self.remove_after:
            shutil.rmtree(folder, ignore_errors=True)

    def tree(self):
        """The master and its workers, as psutil processes."""
        master = psutil.Process(self.process.pid)
        return [master, *master.children(recursive=True)]

    def workers(self):
        return psutil.Process(self.process.pid).children(recursive=True)

    def cpu_seconds(self):
        """CPU time (user + system) used so far by the whole tree."""
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def worker_rss(self):
        """Resident memory of the workers, in bytes."""
        return sum(proc.memory_info().rss for proc in self.workers())

    def sockets_per_worker(self):
        """How many TCP connections each worker holds: shows clients are spread over them."""
        return [len(proc.net_connections(kind="tcp")) for proc in self.workers()]


def gunicorn(app, db_path, log, pythonpath=None, env=None, worker_class=None):
    """The production way to serve `app`: gunicorn with the default gunicorn.conf.py.

    `worker_class` (such as "gevent", gunicorn's stock gevent worker) replaces
    the file's `changefeed.ops.worker.Worker`: gunicorn's command line wins over
    its config file, and every other setting stays the file's.
    """
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    if pythonpath:
        argv += ["--pythonpath", pythonpath]
    if worker_class:
        argv += ["--worker-class", worker_class]
    # Every bench client comes from loopback, standing in for thousands of browsers: no per-client cap.
    env = {"CHANGEFEED_BIND": "127.0.0.1:{port}", "CHANGEFEED_DB": db_path,
           "CHANGEFEED_MAX_WAITS_PER_CLIENT": "1000000", **(env or {})}
    return Process([*argv, app], "/changes?slug=ready", env=env, log=log)


@contextmanager
def postgres_db():
    """A fresh PostgreSQL database made by migrate.py, dropped afterwards; its URL. None without a server.

    On the server at CHANGEFEED_BENCH_DATABASE_URL (default: the one on
    127.0.0.1:5432, as the user running the bench, who may CREATE DATABASE).
    """
    import psycopg
    from psycopg.conninfo import make_conninfo

    admin_url = os.environ.get("CHANGEFEED_BENCH_DATABASE_URL") or "postgresql://127.0.0.1:5432/postgres"
    name = f"changefeed_bench_{os.getpid()}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError:
        yield None
        return
    url = make_conninfo(admin_url, dbname=name)
    try:
        subprocess.run([sys.executable, "migrate.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "CHANGEFEED_DATABASE_URL": url})
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def migrated_db(folder):
    """A fresh database in `folder`, made by migrate.py as a user would."""
    path = str(Path(folder) / "bench.sqlite3")
    subprocess.run([sys.executable, "migrate.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "CHANGEFEED_DB": path})
    return path


def nginx_binary():
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def nginx(http_block, root, ready_path):
    """nginx running `http_block` (with `{port}` for its port) from folder `root`, removed when it stops."""
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes auto;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
{http_block}
}}
""")
    process = Process([nginx_binary(), "-c", str(conf)], ready_path)
    process.remove_after.append(root)
    conf.write_text(conf.read_text().replace("{port}", str(process.port)))
    return process


def nginx_static(body):
    """nginx serving `body` as a static file: the ceiling for a tiny HTTP answer here. None without nginx."""
    if nginx_binary() is None:
        return None
    # A folder of its own that nginx's unprivileged workers can read, when started as root.
    root = Path(tempfile.mkdtemp(prefix="changefeed-nginx-"))
    root.chmod(0o755)
    (root / "changes").write_bytes(body)
    (root / "changes").chmod(0o644)
    return nginx(f"""
    default_type application/json;
    server {{
        listen 127.0.0.1:{{port}};
        root {root};
        location / {{ add_header Cache-Control no-cache; }}
    }}
""", root, "/changes")


def varnish_binary():
    return shutil.which("varnishd") or ("/usr/sbin/varnishd" if os.path.exists("/usr/sbin/varnishd") else None)


def varnish_deploy(upstream):
    """Varnish with deploy/varnish.vcl in front of `upstream` (a Process), on loopback. None without Varnish.

    Only the backends' ports change (both point at the one upstream); the
    cache is the file's, in memory.
    """
    if varnish_binary() is None:
        return None
    root = Path(tempfile.mkdtemp(prefix="changefeed-varnish-"))
    vcl = (ROOT / "deploy" / "varnish.vcl").read_text()
    vcl = vcl.replace('.port = "8000"', f'.port = "{upstream.port}"').replace('.port = "8001"', f'.port = "{upstream.port}"')
    (root / "varnish.vcl").write_text(vcl)
    process = Process([varnish_binary(), "-F", "-j", "none", "-a", "127.0.0.1:{port}", "-f", str(root / "varnish.vcl"),
                       "-n", str(root / "work"), "-s", "malloc,256m", "-T", "none"], "/changes?slug=ready")
    process.remove_after.append(root)
    return process


def nginx_deploy(upstreams):
    """nginx with deploy/nginx.conf in front of `upstreams` (Process), on loopback, plain HTTP. None without nginx.

    Only what a loopback run must change: the upstream servers, the listening
    port (the 443 server, without TLS: the load generator would spend its CPU
    on it), the cache folder. Everything else is the file as shipped.
    """
    if nginx_binary() is None:
        return None
    root = Path(tempfile.mkdtemp(prefix="changefeed-nginx-"))
    root.chmod(0o777)  # nginx's unprivileged workers write the cache here
    block = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = "".join(f"    server {u.url.removeprefix('http://')};\n" for u in upstreams)
    block = re.sub(r"(upstream changefeed \{\n)(?:.*\n)*?(?=    keepalive )", lambda m: m.group(1) + servers, block)
    block = re.sub(r"server \{\n    listen 80;.*?\n\}\n", "", block, flags=re.S)  # the redirect to https
    block = re.sub(r"\n\s*(listen \[::\]|ssl_).*", "", block)
    block = re.sub(r"listen 443 ssl http2;.*", "listen 127.0.0.1:{port};", block)
    block = block.replace("/dev/shm/nginx-changefeed", str(root / "cache"))
    return nginx(block, root, "/changes?slug=ready")

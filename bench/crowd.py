"""Subscribers held by several load-generator processes: more than one process or one address can hold.

One process may have 20,000 open files on these machines (the hard limit,
`ulimit -Hn`), and one source address has about 28,000 ports toward one
server port (`net.ipv4.ip_local_port_range`). So a crowd of 50,000 is
several processes, each with its own loopback address: 127.0.0.2,
127.0.0.3, ... (all of 127.0.0.0/8 is this host on Linux, no setup needed).

Each process runs one asyncio loop (subscribers.py); they report the
monotonic time each subscriber had a version, a clock all processes of the
host share, so the parent measures from when it sent the save.
"""

import asyncio
import math
import multiprocessing
import resource
import time

import subscribers as subs

PER_PROCESS = 12_500  # well under one process's open files and one address's ports
CHECK_S = 0.05  # how often a process looks whether all its subscribers have the version


class Crowd:
    """`count` subscribers of `transport` on `slug`, spread over processes; open on entry, closed on exit."""

    def __init__(self, url, transport, slug, count, since=1):
        self.url, self.transport, self.slug, self.count, self.since = url, transport, slug, count, since
        self.processes, self.pipes = [], []
        self.open_s, self.failed = 0.0, []

    def __enter__(self):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no event loop or sockets inherited
        shares = _shares(self.count, max(2, math.ceil(self.count / PER_PROCESS)))
        started = time.monotonic()
        try:
            for n, share in enumerate(shares):
                ours, theirs = context.Pipe()
                process = context.Process(target=_child, daemon=True,
                                          args=(self.url, self.transport, self.slug, self.since, share,
                                                f"127.0.0.{n + 2}", theirs))
                process.start()
                self.processes.append(process)
                self.pipes.append(ours)
            for pipe in self.pipes:
                self.failed += _receive(pipe, 300)["failed"]
        except BaseException:
            self.__exit__()
            raise
        self.open_s = time.monotonic() - started
        return self

    def arrivals(self, version, timeout_s=10.0):
        """For every subscriber, the monotonic time it had `version` (None: it did not, within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        for pipe in self.pipes:
            pipe.send(("collect", version, deadline))
        arrived, self.failed = [], []
        for pipe in self.pipes:
            report = _receive(pipe, timeout_s + 60)
            arrived += report["at"]
            self.failed += report["failed"]
        return arrived

    def __exit__(self, *exc):
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()


def _shares(count, parts):
    return [count // parts + (1 if n < count % parts else 0) for n in range(parts)]


def _receive(pipe, timeout_s):
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"a load-generator process did not answer in {timeout_s} s")
    return pipe.recv()


def _child(url, transport, slug, since, count, source, pipe):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_hold(url, transport, slug, since, count, source, pipe))


async def _hold(url, transport, slug, since, count, source, pipe):
    loop = asyncio.get_running_loop()
    async with subs.session(count, source) as http:
        seens, tasks = await subs.subscribe_all(http, url, transport, [slug] * count, since, {"requests": 0},
                                                source=source)
        pipe.send({"failed": [s.failed for s in seens if s.failed]})
        while (message := await loop.run_in_executor(None, pipe.recv))[0] == "collect":
            _, version, deadline = message
            while time.monotonic() < deadline and any(s.version < version and s.failed is None for s in seens):
                await asyncio.sleep(CHECK_S)
            pipe.send({"at": [s.at.get(version) for s in seens], "failed": [s.failed for s in seens if s.failed]})
        await subs.cancel(tasks)

"""The examples of README.md and docs/*.md, read and run as a reader would type them.

Every fenced block whose language is `sh` is an example, and so is every
`python` block of the Python client's page (docs/client.md). It is run
against a real server unless the line just above it says why it cannot be:

    <!-- not run: starts the service itself; the tests start their own -->

A shell block may ask for settings of its own (the server it runs against,
and its shell, get them): `<!-- run with: CHANGEFEED_JWT_SECRET=... -->`.

In a shell block, each command (a line, continued by a trailing backslash)
may be followed by the answer it prints, as comment lines
(`# {"changed":false,...}`). A command shown without an answer must print
nothing, and every command must succeed (a curl that stops listening to a
stream by its own `--max-time` may end with curl's timeout status, 28, and a
command run under `timeout`, such as a watch that would run forever, with
timeout's, 124). Answers that are JSON are compared as JSON, letting `updated_at`, `epoch`,
`request_id` and feed cursors be any well-formed one and `"..."` stand for
any value; other answers are compared as text, with times, 16-hex-digit ids
and feed cursors left free.

A `python` block is a program of its own: it is run, in the page's order, as
a script with the tests' Python, in one scratch folder the page's scripts
share, with `CHANGEFEED_URL` set to the server's URL. It must end by itself
(a watch breaks out of its loop) with status 0. When the next fenced block
after it is a `text` block, that is what it prints, compared as text as
above.
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from support import ROOT

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
HEX16 = re.compile(r"[0-9a-f]{16}")
FEED_CURSOR = re.compile(r"[0-9a-f]{16}\.\d+(\.[A-Za-z0-9-]+)?")  # a /feed `next`: its numbers are the database's own
FREE_FORMS = {"updated_at": ISO_MS, "epoch": HEX16, "request_id": HEX16,  # request_id: the server's own
              "next": FEED_CURSOR, "cursor": FEED_CURSOR}  # cursor: the Python client's `Change.cursor`
SHELLS = {"sh", "bash", "shell", "console"}
END = "@@end-of-example-command@@"


@dataclass
class Block:
    """One fenced `sh` block of a page: its commands with their answers, and how it may run."""

    page: str
    line: int
    commands: list[tuple[str, str]]  # (command, the answer shown under it: "" for none)
    not_run: str | None = None  # why it cannot run, when the page says so
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Script:
    """One fenced `python` block of a page: a program run on its own, and what the page says it prints."""

    page: str
    line: int
    source: str
    prints: str | None = None  # the `text` block right after it, when there is one
    not_run: str | None = None  # why it cannot run, when the page says so

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def fenced(text: str) -> list[re.Match[str]]:
    """Every fenced block of a page's text: its language is group 1, its content group 2."""
    return list(re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S))


def mark_above(text: str, start: int) -> re.Match[str] | None:
    """The `<!-- not run: ... -->` or `<!-- run with: ... -->` line just above a block, if there is one."""
    above = [line for line in text[:start].splitlines() if line.strip()][-1:]
    return re.fullmatch(r"<!-- (not run|run with): (.+) -->", above[0].strip()) if above else None


def python_blocks(path: Path) -> list[Script]:
    """Return every `python` block of the page at `path`, in order, each with the `text` block after it."""
    text = path.read_text()
    blocks = fenced(text)
    scripts = []
    for index, match in enumerate(blocks):
        if match.group(1) != "python":
            continue
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        mark = mark_above(text, match.start())
        scripts.append(Script(
            path.name, text.count("\n", 0, match.start()) + 1, match.group(2),
            following.group(2) if following is not None and following.group(1) == "text" else None,
            mark.group(2) if mark and mark.group(1) == "not run" else None))
    return scripts


def run_script(script: Script, url: str, folder: Path, timeout: float = 60, python: str = sys.executable,
               env: Mapping[str, str] | None = None) -> str:
    """Run `script` as a program in `folder` against the server at `url`; return what it printed.

    It runs with `python` (the tests' own by default) in `env` (the tests'
    own by default), with `CHANGEFEED_URL` set to `url`. Fails the test when
    it exits with another status than 0, or is still running after `timeout`
    seconds (a watch that never stops).
    """
    path = folder / f"{Path(script.page).stem}_line_{script.line}.py"
    path.write_text(script.source)
    try:
        result = subprocess.run([python, str(path)], capture_output=True, text=True, timeout=timeout,
                                cwd=folder, env={**(os.environ if env is None else env), "CHANGEFEED_URL": url})
    except subprocess.TimeoutExpired as expired:  # its output comes as bytes here, whatever `text` says
        printed = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout
        raise AssertionError(f"{script}: still running after {timeout} s; printed: {printed!r}") from None
    assert result.returncode == 0, f"{script}: exited with status {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def shell_blocks(path: Path) -> list[Block]:
    """Return every shell block of the page at `path`, in order."""
    text = path.read_text()
    blocks = []
    for match in fenced(text):
        if match.group(1) not in SHELLS:
            continue
        mark = mark_above(text, match.start())
        block = Block(path.name, text.count("\n", 0, match.start()) + 1, commands(match.group(2)))
        if mark and mark.group(1) == "not run":
            block.not_run = mark.group(2)
        elif mark:
            block.env = dict(pair.split("=", 1) for pair in mark.group(2).split())
        blocks.append(block)
    return blocks


def commands(source: str) -> list[tuple[str, str]]:
    """Split a block into (command, answer shown under it) pairs."""
    pairs: list[list[str]] = []
    pending = ""
    for line in source.splitlines():
        if pending:
            pending += "\n" + line
        elif line.startswith("#"):
            assert pairs, f"an answer with no command above it: {line!r}"
            pairs[-1][1] += line.removeprefix("#").removeprefix(" ") + "\n"
            continue
        elif line.strip():
            pending = line
        if pending and not pending.endswith("\\"):
            pairs.append([pending, ""])
            pending = ""
    return [(command, answer.strip()) for command, answer in pairs]


def run(block: Block, url: str, env: dict[str, str]) -> list[tuple[str, str, str]]:
    """Run the block's commands in one shell against `url`; return (command, shown, printed) triples."""
    host = url.removeprefix("http://")
    script = "".join(
        re.sub(r"127\.0\.0\.1:(5000|8000)", host, command) + f"\nprintf '\\n{END} %d\\n' $?\n"
        for command, _ in block.commands)
    environ = {**os.environ, **env, **block.env,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=environ)
    parts = re.split(rf"\n{END} (\d+)\n", result.stdout)
    printed, statuses = parts[0::2], [int(status) for status in parts[1::2]]
    assert len(statuses) == len(block.commands), f"{block}: the shell stopped early: {result.stderr}"
    for (command, _), status in zip(block.commands, statuses):
        allowed = {0, 28} if "--max-time" in command else {0, 124} if command.startswith("timeout ") else {0}
        assert status in allowed, f"{block}: `{command}` failed with status {status}: {result.stderr}"
    return [(command, shown, out.strip()) for (command, shown), out in zip(block.commands, printed)]


def same_answer(printed: str, shown: str) -> bool:
    """Whether a command printed what the page shows under it."""
    try:
        expected = json.loads(shown)
    except json.JSONDecodeError:
        return free(printed) == free(shown)
    try:
        return same_json(json.loads(printed), expected)
    except json.JSONDecodeError:
        return False


def same_json(actual: object, expected: object) -> bool:
    """Compare JSON values; `updated_at`, `epoch` and `request_id` need only be well formed, `"..."` is anything."""
    if expected == "...":
        return True
    if isinstance(expected, dict) and isinstance(actual, dict):
        if actual.keys() != expected.keys():
            return False
        return all(
            bool(FREE_FORMS[key].fullmatch(str(actual[key]))) if key in FREE_FORMS and expected[key] != "..."
            else same_json(actual[key], expected[key]) for key in expected)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(actual) == len(expected) and all(map(same_json, actual, expected))
    return actual == expected


def free(text: str) -> str:
    """Text with its times, 16-hex-digit ids and feed cursors made alike, and trailing spaces gone."""
    text = HEX16.sub("<id>", ISO_MS.sub("<time>", FEED_CURSOR.sub("<cursor>", text)))
    return "\n".join(line.rstrip() for line in text.strip().splitlines())

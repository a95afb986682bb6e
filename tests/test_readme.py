"""The README is the manual: its curl lines work as shown, its settings table is complete."""

import json
import re
import subprocess

import pytest

from changefeed.core import settings
from support import ROOT

README = (ROOT / "README.md").read_text()
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
EPOCH = re.compile(r"[0-9a-f]{16}")
REQUEST_ID = re.compile(r"[0-9a-f]{16}")  # the server's own: curl sends none


def curl_examples():
    """Return (command, expected answer) pairs from the README's first sh block."""
    block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    lines = block.strip().splitlines()
    return [(command, expected.removeprefix("# "))
            for command, expected in zip(lines[::2], lines[1::2], strict=True)]


def same_answer(actual, expected):
    """Compare answers, letting each `updated_at`, `epoch` and `request_id` be any well-formed one."""
    for key, form in (("updated_at", ISO_MS), ("epoch", EPOCH), ("request_id", REQUEST_ID)):
        if isinstance(expected, dict) and key in expected:
            assert form.fullmatch(actual.pop(key))
            expected = {k: v for k, v in expected.items() if k != key}
    assert actual == expected


def test_readme_curl_lines_answer_as_shown(server):
    examples = curl_examples()
    assert len(examples) >= 5
    for command, expected in examples:
        assert command.startswith("curl ")
        command = command.replace("http://127.0.0.1:5000", server.url)
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        same_answer(json.loads(result.stdout), json.loads(expected))


@pytest.mark.parametrize("name, default, help", settings.SETTINGS, ids=[s[0] for s in settings.SETTINGS])
def test_every_setting_is_in_the_readme_with_its_default(name, default, help):
    row = re.search(rf"^\| `{name}` \| `?([^|`]*)`? \|", README, re.M)
    assert row, f"{name} is missing from the README's configuration table"
    assert row.group(1) == str(default)

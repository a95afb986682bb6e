"""The manual (README.md and docs/) says what the service does: its examples run, its settings page is generated.

How a page's shell and Python examples are found, marked, run and compared: tests/support/docs.py.
"""

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from changefeed.core import settings
from support import ROOT
from support.databases import Database
from support.docs import free, python_blocks, run, run_script, same_answer, shell_blocks
from support.servers import Server

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLIENT = ROOT / "docs" / "client.md"  # the page whose Python examples are programs to run
CONFIGURATION = ROOT / "docs" / "configuration.md"
REGENERATE = "python -m changefeed.core.settings > docs/configuration.md"


def test_the_configuration_page_is_the_settings_table() -> None:
    assert CONFIGURATION.read_text() == settings.markdown(), (
        f"docs/configuration.md is stale: run `{REGENERATE}` and commit it")


@pytest.mark.parametrize("name, default", [(s[0], s[1]) for s in settings.SETTINGS], ids=[s[0] for s in settings.SETTINGS])
def test_every_setting_is_in_the_manual_with_its_default(name: str, default: object) -> None:
    row = re.search(rf"^\| `{name}` \| `?([^|`]*)`? \|", CONFIGURATION.read_text(), re.M)
    assert row, f"{name} is missing from the configuration table of docs/configuration.md"
    assert row.group(1) == str(default)


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_shell_examples_answer_as_shown(page: Path, make_server: Callable[..., Server], database: Database) -> None:
    """Each page's examples run in order, as a reader would type them, against a fresh server of its own."""
    servers: dict[tuple[tuple[str, str], ...], Server] = {}
    for block in shell_blocks(page):
        if block.not_run:
            continue
        key = tuple(sorted(block.env.items()))
        if key not in servers:
            servers[key] = make_server(env=block.env)
        for command, shown, printed in run(block, servers[key].url, database.config):
            assert same_answer(printed, shown), f"{block}: {command}\nprinted: {printed}\npage shows: {shown}"


def test_the_python_client_examples_run_in_order_and_print_what_the_page_shows(
        make_server: Callable[..., Server], tmp_path: Path) -> None:
    """Each Python block of docs/client.md, a program of its own, against one fresh server, in the page's order."""
    server = make_server()
    scripts = [script for script in python_blocks(CLIENT) if not script.not_run]
    assert len(scripts) >= 5, "docs/client.md lost its examples"
    folder = tmp_path / "examples"  # the scripts' working folder: what one writes (a cursor) the next may read
    folder.mkdir()
    for script in scripts:
        printed = run_script(script, server.url, folder, timeout=60)
        if script.prints is not None:
            assert free(printed) == free(script.prints), f"{script}\nprinted:\n{printed}\npage shows:\n{script.prints}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_a_block_that_does_not_run_says_why(page: Path) -> None:
    for block in [*shell_blocks(page), *(python_blocks(page) if page == CLIENT else [])]:
        assert block.not_run is None or len(block.not_run) > 10, f"{block}: say why it is not run"
    code = re.findall(r"^```(\w*)$", page.read_text(), re.M)
    assert "" not in code[::2], f"{page.name}: every code block names its language (sh, text, js, ...)"
    fenced, previous = False, ""
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fenced ^= line.startswith("```")
        assert fenced or previous or not line.startswith("    "), (
            f"{page.name}:{number}: an indented code block, which this test cannot see: fence it")
        previous = line.strip()


def test_the_readme_is_the_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README links to no docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_links_between_pages_lead_somewhere(page: Path) -> None:
    for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
        linked = (page.parent / target).resolve() if target else page
        assert linked.exists(), f"{page.name} links to {target}, which is not there"
        if anchor and linked.suffix == ".md":
            assert anchor in headings(linked), f"{page.name} links to {target}#{anchor}: no such heading"


def headings(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}

"""create_app(): the standalone service is the extension at the root, and app.py holds no view."""

import ast
from pathlib import Path

from changefeed.http.services import KEY, Services

ROOT = Path(__file__).resolve().parent.parent


def test_the_app_keeps_one_services_object_and_the_older_extension_keys(app):
    feed = app.extensions[KEY]
    assert isinstance(feed, Services) and feed.url_prefix == ""
    assert app.extensions["changefeed.store"] is feed.store
    assert app.extensions["changefeed.notifier"] is feed.notifier
    assert app.extensions["changefeed.auth"] is feed.verifier
    assert app.extensions["changefeed.queries"] is feed.queries
    assert app.extensions["changefeed.waits"] is feed.waits


def test_every_view_is_a_blueprint_s_and_the_static_files_the_app_s(app):
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert {e for e in endpoints if "." not in e} == {"static"}
    assert {e.split(".")[0] for e in endpoints if "." in e} == {"changefeed", "changefeed_metrics"}


def test_app_py_defines_no_view():
    tree = ast.parse((ROOT / "app.py").read_text())
    functions = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    assert functions == ["create_app"]


def test_the_demo_files_are_the_package_s_and_the_top_level_links_to_them():
    assert (ROOT / "static").resolve() == ROOT / "changefeed" / "http" / "static"
    assert (ROOT / "templates").resolve() == ROOT / "changefeed" / "http" / "templates"


def test_the_old_cli_commands_and_the_changefeed_group(app):
    runner = app.test_cli_runner()
    for args in (["delete-page", "--help"], ["token", "create", "--help"], ["changefeed", "migrate", "--help"]):
        assert runner.invoke(args=args).exit_code == 0, args
    assert "already at schema version" in runner.invoke(args=["changefeed", "migrate"]).output

"""Unit tests of changefeed/core/settings.py: each setting read from its environment variable, or its default."""

import pytest

from changefeed.core.settings import DEFAULTS, SETTINGS, from_environ


def test_every_setting_is_named_for_the_service_and_has_a_default_of_a_plain_type_and_a_line_of_help():
    for name, default, help_text in SETTINGS:
        assert name.startswith("CHANGEFEED_"), name
        assert isinstance(default, (str, int)) and not isinstance(default, bool), name
        assert help_text.strip(), name


def test_no_setting_is_listed_twice():
    names = [name for name, _, _ in SETTINGS]
    assert len(names) == len(set(names)) == len(DEFAULTS)


def test_an_empty_environment_gives_every_default():
    assert from_environ({}) == DEFAULTS


def test_an_empty_variable_counts_as_unset():
    assert from_environ({"CHANGEFEED_MAX_WAIT_S": "", "CHANGEFEED_DB": ""}) == DEFAULTS


def test_a_number_setting_is_read_as_an_integer():
    values = from_environ({"CHANGEFEED_MAX_WAIT_S": "25", "CHANGEFEED_JWT_LEEWAY_S": "-5"})
    assert values["CHANGEFEED_MAX_WAIT_S"] == 25
    assert values["CHANGEFEED_JWT_LEEWAY_S"] == -5


def test_a_text_setting_is_taken_as_written():
    assert from_environ({"CHANGEFEED_DB": " /srv/feed.sqlite3"})["CHANGEFEED_DB"] == " /srv/feed.sqlite3"


def test_variables_that_are_not_settings_are_left_out():
    assert "PATH" not in from_environ({"PATH": "/usr/bin"})


@pytest.mark.parametrize("raw", ["ten", "1.5", "10s", "0x10"])
def test_a_number_setting_refuses_what_is_not_an_integer_naming_the_setting_and_the_value(raw):
    with pytest.raises(SystemExit) as refused:
        from_environ({"CHANGEFEED_MAX_PAGES": raw})
    assert str(refused.value) == f"CHANGEFEED_MAX_PAGES must be an integer, got {raw!r}"


def test_the_process_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("CHANGEFEED_WS_MAX_SLUGS", "7")
    assert from_environ()["CHANGEFEED_WS_MAX_SLUGS"] == 7

"""Unit tests of changefeed/core/schemas.py: what the API accepts, refused field by field before any view."""

import pytest
from marshmallow import ValidationError

from changefeed.core.schemas import (
    DEPTH_MESSAGE,
    MAX_INTEGER,
    SURROGATE_MESSAGE,
    ChangesQuerySchema,
    IdempotencyKeySchema,
    LastEventIdSchema,
    SaveFormSchema,
    SaveSchema,
    data_problem,
    has_surrogate,
)


def errors_of(schema, data):
    with pytest.raises(ValidationError) as refused:
        schema.load(data)
    return refused.value.messages


def test_a_save_loads_with_its_slug_folded_and_its_data_as_compact_json_text():
    item = SaveSchema(max_html_bytes=100, max_data_bytes=100).load(
        {"slug": "Home", "html": "<h1>Hi</h1>", "data": {"title": "Hé", "n": [1, 2]}})
    assert item == {"slug": "home", "html": "<h1>Hi</h1>", "data": '{"title":"Hé","n":[1,2]}', "base_version": None}


def test_a_save_over_its_size_limits_is_refused_naming_the_field():
    schema = SaveSchema(max_html_bytes=4, max_data_bytes=8)
    assert "at most 4 bytes" in errors_of(schema, {"slug": "a", "html": "ééé"})["html"][0]
    assert "at most 8 bytes" in errors_of(schema, {"slug": "a", "html": "", "data": "123456789"})["data"][0]


def test_a_save_refuses_a_nul_character_unknown_fields_and_a_bad_slug():
    schema = SaveSchema(max_html_bytes=100, max_data_bytes=100)
    assert "NUL" in errors_of(schema, {"slug": "a", "html": "a\x00b"})["html"][0]
    assert "extra" in errors_of(schema, {"slug": "a", "html": "", "extra": 1})
    assert "hyphen" in errors_of(schema, {"slug": "a b", "html": ""})["slug"][0]


def test_the_kelvin_sign_is_not_a_k_in_a_slug():
    assert "slug" in errors_of(SaveSchema(max_html_bytes=100, max_data_bytes=100), {"slug": "\u212a", "html": ""})


def test_a_form_save_reads_its_data_as_json_text():
    schema = SaveFormSchema(max_html_bytes=100, max_data_bytes=100)
    assert schema.load({"slug": "a", "html": "x", "data": '{"a": 1}'})["data"] == '{"a":1}'
    assert "JSON text" in errors_of(schema, {"slug": "a", "html": "x", "data": "{"})["data"][0]
    assert "JSON" in errors_of(schema, {"slug": "a", "html": "x", "data": "NaN"})["data"][0]


def test_data_problem_finds_what_json_cannot_carry_back():
    assert data_problem({"a": [1, "b", None, 1.5]}, 64, 1000) is None
    assert "finite" in data_problem([float("inf")], 64, 1000)
    assert data_problem(["\ud800"], 64, 1000) == SURROGATE_MESSAGE
    assert "key" in data_problem({"\udfff": 1}, 64, 1000)


def test_data_problem_stops_at_the_depth_limit_and_the_value_count_without_recursion():
    deep = []
    for _ in range(100_000):  # deeper than any stack
        deep = [deep]
    assert data_problem(deep, 64, 10**9) == DEPTH_MESSAGE
    assert "more than 10 values" in data_problem(list(range(11)), 64, 10)


def test_has_surrogate_answers_ascii_without_a_scan_and_finds_a_lone_surrogate():
    assert not has_surrogate("plain") and not has_surrogate("\U0001f600") and has_surrogate("a\udc80")


@pytest.mark.parametrize("since", ["-1", "1.5", "x", str(MAX_INTEGER + 1), "1" * 5000])
def test_a_version_is_a_whole_number_within_sqlites_integers(since):
    assert "since" in errors_of(ChangesQuerySchema(), {"slug": "a", "since": since})


def test_the_longest_wait_is_the_configured_one():
    assert ChangesQuerySchema(max_wait_s=5).load({"slug": "a", "wait": "5"})["wait"] == 5
    assert "0 to 5" in errors_of(ChangesQuerySchema(max_wait_s=5), {"slug": "a", "wait": "6"})["wait"][0]


def test_a_last_event_id_is_an_epoch_and_a_version_or_a_version_alone():
    schema = LastEventIdSchema()
    assert schema.load({"Last-Event-ID": "ep-1:42"})["last_event_id"] == {"epoch": "ep-1", "since": 42}
    assert schema.load({"Last-Event-ID": "42"})["last_event_id"] == {"epoch": None, "since": 42}
    assert "Last-Event-ID" in errors_of(schema, {"Last-Event-ID": "bad epoch:4"})


def test_an_idempotency_key_may_be_quoted_as_a_structured_field_string():
    schema = IdempotencyKeySchema()
    assert schema.load({"Idempotency-Key": '"k-1"'})["key"] == schema.load({"Idempotency-Key": "k-1"})["key"] == "k-1"
    assert "Idempotency-Key" in errors_of(schema, {"Idempotency-Key": "has space"})

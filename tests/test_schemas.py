"""changefeed.core.schemas on its own: the rules every input meets, without a request around them.

The end-to-end tests (test_errors.py, test_hostile.py) send each kind of bad
input through every endpoint; these pin the rules themselves: where each
boundary lies, which rule speaks first, and that the checks of `data` hold
for any value, however deep.
"""

import math
import random

import pytest
from marshmallow import Schema, ValidationError

from changefeed.core.schemas import (
    DEPTH_MESSAGE,
    MAX_DATA_DEPTH,
    SURROGATE_MESSAGE,
    ChangesQuerySchema,
    IdempotencyKeySchema,
    LastEventIdSchema,
    PresenceSchema,
    SaveFormSchema,
    SaveSchema,
    data_problem,
    has_surrogate,
    validate_slug,
)

BEAT = {"slug": "home", "client_id": "tab-12345678", "state": "viewing"}
ENOUGH = 10**6  # a value limit no test here reaches


def refusal(schema, item):
    """The messages of the ValidationError `schema.load(item)` raises."""
    with pytest.raises(ValidationError) as refused:
        schema.load(item)
    return refused.value.messages


def nested(levels):
    """A value of `levels` arrays, one inside the other, around a number."""
    value = 1
    for _ in range(levels):
        value = [value]
    return value


# Slugs.

@pytest.mark.parametrize("slug", ["a", "home", "Docs-2", "-", "a" * 120])
def test_a_slug_of_1_to_120_ascii_letters_digits_and_hyphens_is_valid(slug):
    validate_slug(slug)


@pytest.mark.parametrize("slug", ["", "a b", "a_b", "a/b", "café", "a\n"])
def test_any_other_character_or_an_empty_slug_is_refused_saying_the_rule(slug):
    with pytest.raises(ValidationError, match="each an ASCII letter, digit or hyphen"):
        validate_slug(slug)


def test_a_slug_over_120_characters_is_refused_saying_how_long_it_was():
    with pytest.raises(ValidationError, match=r"at most 120 characters long \(got 121\)"):
        validate_slug("a" * 121)


def test_a_slug_is_folded_to_lower_case_so_home_is_home():
    assert SaveSchema(100, 100).load({"slug": "HoMe", "html": ""})["slug"] == "home"


def test_a_slug_is_checked_as_sent_before_folding_so_the_kelvin_sign_is_not_a_k():
    assert "\u212a".lower() == "k"  # what folding first would let through
    assert "slug" in refusal(SaveSchema(100, 100), {"slug": "\u212a", "html": ""})


# Text: valid Unicode, before any other rule.

@pytest.mark.parametrize("text, expected", [
    ("plain ascii", False), ("café, 😀", False), ("\ud800", True), ("a\udfff", True), ("😀\ud83d", True),
])
def test_has_surrogate_finds_a_lone_surrogate_anywhere(text, expected):
    assert has_surrogate(text) is expected


def test_text_refuses_a_lone_surrogate_before_the_fields_own_rule():
    """A name of 50 surrogates breaks the length rule too: the surrogate is what the client is told."""
    assert refusal(PresenceSchema(), {**BEAT, "name": "\ud800" * 50}) == {"name": [SURROGATE_MESSAGE]}
    assert refusal(PresenceSchema(), {**BEAT, "slug": "\udfff"}) == {"slug": [SURROGATE_MESSAGE]}


def test_text_takes_any_valid_unicode():
    assert PresenceSchema().load({**BEAT, "name": "Zoë 😀"})["name"] == "Zoë 😀"


# data: what JSON can say back, at any depth.

def test_data_nested_as_deep_as_the_limit_is_accepted_and_one_level_more_refused():
    assert data_problem(nested(MAX_DATA_DEPTH), MAX_DATA_DEPTH, ENOUGH) is None
    assert data_problem(nested(MAX_DATA_DEPTH + 1), MAX_DATA_DEPTH, ENOUGH) == DEPTH_MESSAGE


def test_data_nested_far_past_any_stack_is_refused_without_recursing():
    assert data_problem(nested(200_000), MAX_DATA_DEPTH, ENOUGH) == DEPTH_MESSAGE


def test_objects_count_as_levels_like_arrays():
    value = {"a": 1}
    for _ in range(MAX_DATA_DEPTH):
        value = {"a": value}
    assert data_problem(value, MAX_DATA_DEPTH, ENOUGH) == DEPTH_MESSAGE


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan])
def test_a_number_json_cannot_say_is_refused_wherever_it_is(number):
    for value in (number, [1, [number]], {"n": {"m": number}}):
        assert "must be finite" in data_problem(value, MAX_DATA_DEPTH, ENOUGH)


def test_a_lone_surrogate_in_a_string_or_a_key_is_refused_saying_which():
    assert data_problem(["ok", {"k": "\ud800"}], MAX_DATA_DEPTH, ENOUGH) == SURROGATE_MESSAGE
    assert data_problem({"ok": {"\ud800": 1}}, MAX_DATA_DEPTH, ENOUGH).startswith("A key contains")


def test_more_values_than_the_size_limit_allows_are_refused_before_the_walk_ends():
    """Each value is at least one byte of JSON: a value holding more than the limit is over it anyway."""
    assert data_problem(list(range(9)), MAX_DATA_DEPTH, 10) is None  # the array and its 9 numbers
    assert "more than 10 values" in data_problem(list(range(10)), MAX_DATA_DEPTH, 10)


def test_ordinary_data_has_no_problem():
    assert data_problem({"title": "Hi", "tags": ["a", "b"], "n": 1.5, "ok": True, "none": None},
                        MAX_DATA_DEPTH, ENOUGH) is None


# What a save becomes.

def test_a_save_stores_data_as_compact_json_text():
    item = SaveSchema(100, 100).load({"slug": "a", "html": "x", "data": {"a": [1, 2.5], "é": "ü"}})
    assert item["data"] == '{"a":[1,2.5],"é":"ü"}'


def test_html_is_measured_in_bytes_of_utf8_not_characters():
    assert SaveSchema(4, 100).load({"slug": "a", "html": "éé"})["html"] == "éé"
    assert refusal(SaveSchema(3, 100), {"slug": "a", "html": "éé"}) == {
        "html": ["Must be at most 3 bytes of UTF-8 (got 4)."]}


def test_a_nul_in_html_is_refused_on_every_engine():
    assert "NUL" in refusal(SaveSchema(100, 100), {"slug": "a", "html": "a\x00b"})["html"][0]


@pytest.mark.parametrize("text, message", [
    ("NaN", "Must be JSON text in a form body: NaN is not valid JSON."),
    ("[" * 100_000, DEPTH_MESSAGE),  # the parser itself gives up: still the depth rule's answer
])
def test_form_data_is_strict_json_text(text, message):
    assert refusal(SaveFormSchema(100, ENOUGH), {"slug": "a", "html": "x", "data": text}) == {"data": [message]}


# Queries and headers.

def test_the_longest_wait_is_the_configured_one():
    assert ChangesQuerySchema(max_wait_s=5).load({"slug": "a", "wait": "5"})["wait"] == 5
    assert "from 0 to 5" in refusal(ChangesQuerySchema(max_wait_s=5), {"slug": "a", "wait": "6"})["wait"][0]


@pytest.mark.parametrize("since", ["-1", "1.5", "1e3", "9" * 20, "٣"])
def test_a_version_is_plain_decimal_digits(since):
    assert "since" in refusal(ChangesQuerySchema(), {"slug": "a", "since": since})


@pytest.mark.parametrize("header, expected", [
    ("5f0c8e2a9b1d4c3e:7", {"epoch": "5f0c8e2a9b1d4c3e", "since": 7}),
    ("7", {"epoch": None, "since": 7}),
])
def test_a_last_event_id_is_an_epoch_and_a_version_or_a_version_alone(header, expected):
    assert LastEventIdSchema().load({"Last-Event-ID": header}) == {"last_event_id": expected}


def test_an_idempotency_key_may_come_quoted_as_a_structured_field_string():
    assert IdempotencyKeySchema().load({"Idempotency-Key": '"key-1"'}) == {"key": "key-1"}
    assert IdempotencyKeySchema().load({"Idempotency-Key": "key-1"}) == {"key": "key-1"}


def test_a_save_over_its_size_limits_is_refused_naming_the_field():
    schema = SaveSchema(max_html_bytes=4, max_data_bytes=8)
    assert "at most 4 bytes" in refusal(schema, {"slug": "a", "html": "ééé"})["html"][0]
    assert "at most 8 bytes" in refusal(schema, {"slug": "a", "html": "", "data": "123456789"})["data"][0]


def test_a_save_refuses_unknown_fields():
    assert "extra" in refusal(SaveSchema(100, 100), {"slug": "a", "html": "", "extra": 1})


SAVE_FIELDS = ["slug", "html", "data", "base_version", "extra"]
SAVE_VALUES = [None, True, 0, 1, -1, 2**63 - 1, 2**63, 1.0, 1e400, "home", "Home", "HOME-2", "K\u212a", "a b",
               "", "a" * 120, "a" * 121, "<p>x</p>", "x\x00y", "\ud800", "caf\u00e9", "7", [], {}, {"n": [1, "\udfff"]},
               {"deep": [[[[1]]]]}, "h" * 40]


def marshmallow_load(schema, body):
    """What marshmallow alone makes of `body`: the loaded save, or the refusal's messages."""
    try:
        return Schema.load(schema, body)
    except ValidationError as refused:
        return refused.messages


def short_way_load(schema, body):
    try:
        return schema.load(body)
    except ValidationError as refused:
        return refused.messages


@pytest.mark.parametrize("seed", range(40))
def test_a_save_loads_the_short_way_exactly_as_marshmallow_loads_it(seed):
    """SaveSchema.load skips marshmallow for plain bodies: every body, plain or not, gets marshmallow's answer."""
    schema = SaveSchema(max_html_bytes=30, max_data_bytes=12)
    pick = random.Random(seed)
    for _ in range(300):
        body = {name: pick.choice(SAVE_VALUES) for name in pick.sample(SAVE_FIELDS, pick.randint(0, 5))}
        assert short_way_load(schema, body) == marshmallow_load(schema, body), body


def test_a_plain_save_takes_the_short_way():
    """The short way is taken (marshmallow is not called) for what nearly every save sends."""
    schema = SaveSchema(max_html_bytes=100, max_data_bytes=100)
    body = {"slug": "Home", "html": "<p>hi</p>", "data": {"n": 1}, "base_version": 3}
    assert schema._load_plain(body) == {"slug": "home", "html": "<p>hi</p>", "data": '{"n":1}', "base_version": 3}
    assert schema.load(body) == marshmallow_load(schema, body)
    assert SaveFormSchema(max_html_bytes=100, max_data_bytes=100).load({"slug": "a", "html": "", "data": "[1]"})[
        "data"] == "[1]"  # a form's data is JSON text: marshmallow's pre_load parses it

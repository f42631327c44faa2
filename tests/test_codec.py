"""fnhost_sdk.codec: payloads decoded by the handler's annotation, results encoded by type."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, Field

from fnhost_sdk.codec import decoder_for, encode
from fnhost_sdk.errors import PayloadError


class Item(BaseModel):
    sku: str = Field(min_length=1)
    qty: int = Field(gt=0)


class Order(BaseModel):
    order_id: str
    items: list[Item] = []


@dataclass
class Point:
    x: int
    y: int


# --------------------------------------------------------------------- decode


def test_bytes_pass_through_untouched() -> None:
    decode = decoder_for(bytes)
    assert decode(b"\x00\xffnot text") == b"\x00\xffnot text"
    assert decode(b"") == b""


def test_str_is_utf8() -> None:
    decode = decoder_for(str)
    assert decode("café ☕".encode()) == "café ☕"
    assert decode(b"") == ""


def test_str_that_is_not_utf8_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="not UTF-8"):
        decoder_for(str)(b"caf\xe9")


@pytest.mark.parametrize("annotation", [inspect.Parameter.empty, Any, object, dict, list])
def test_no_annotation_any_dict_and_list_parse_json(annotation: Any) -> None:
    decode = decoder_for(annotation)
    if annotation is list:
        assert decode(b'[1, "two", {"three": 3}]') == [1, "two", {"three": 3}]
    else:
        assert decode(b'{"a": [1, 2], "b": null}') == {"a": [1, 2], "b": None}


@pytest.mark.parametrize("annotation", [inspect.Parameter.empty, Any, dict, list])
def test_json_that_does_not_parse_is_a_payload_error_that_says_where(annotation: Any) -> None:
    with pytest.raises(PayloadError) as raised:
        decoder_for(annotation)(b'{"a": 1,')
    message = str(raised.value)
    assert "not JSON" in message
    assert "line 1 column" in message


@pytest.mark.parametrize(
    ("annotation", "payload", "message"),
    [
        (dict, b"[1, 2]", "not an object: got an array"),
        (dict, b'"text"', "not an object: got a string"),
        (dict, b"null", "not an object: got null"),
        (list, b'{"a": 1}', "not an array: got an object"),
        (list, b"42", "not an array: got a number"),
        (list, b"true", "not an array: got a boolean"),
    ],
)
def test_json_of_the_wrong_shape_for_dict_or_list_is_a_payload_error(
    annotation: type, payload: bytes, message: str
) -> None:
    """A handler annotated ``dict`` must never receive a list: that is bad input (400, or a
    dead letter at first delivery), not a handler crash (500, retried max_deliver times)."""
    with pytest.raises(PayloadError, match=message):
        decoder_for(annotation)(payload)


def test_a_pydantic_model_is_validated() -> None:
    order = decoder_for(Order)(b'{"order_id": "o1", "items": [{"sku": "a", "qty": 2}]}')
    assert order == Order(order_id="o1", items=[Item(sku="a", qty=2)])


def test_a_payload_that_does_not_fit_the_model_names_the_field() -> None:
    with pytest.raises(PayloadError) as raised:
        decoder_for(Order)(b'{"order_id": "o1", "items": [{"sku": "", "qty": 0}]}')
    message = str(raised.value)
    assert message.startswith("payload does not fit Order: ")
    assert "items.0.sku" in message
    assert "items.0.qty" in message
    assert "\n" not in message, "one line: it travels in a NATS header"


def test_bad_json_for_a_model_is_a_payload_error() -> None:
    with pytest.raises(PayloadError) as raised:
        decoder_for(Order)(b"{not json")
    assert "Order" in str(raised.value)
    assert "JSON" in str(raised.value)


def test_a_missing_field_is_named() -> None:
    with pytest.raises(PayloadError, match=r"order_id: Field required"):
        decoder_for(Order)(b"{}")


def test_a_dataclass_is_validated() -> None:
    assert decoder_for(Point)(b'{"x": 1, "y": 2}') == Point(1, 2)
    with pytest.raises(PayloadError, match=r"payload does not fit Point: y: "):
        decoder_for(Point)(b'{"x": 1, "y": "two"}')


def test_a_list_of_models_is_validated_item_by_item() -> None:
    decode = decoder_for(list[Item])
    assert decode(b'[{"sku": "a", "qty": 1}, {"sku": "b", "qty": 3}]') == [
        Item(sku="a", qty=1),
        Item(sku="b", qty=3),
    ]
    with pytest.raises(PayloadError) as raised:
        decode(b'[{"sku": "a", "qty": 1}, {"sku": "b", "qty": -1}]')
    assert "1.qty" in str(raised.value)


def test_other_types_pydantic_understands_are_validated() -> None:
    assert decoder_for(int)(b"42") == 42
    assert decoder_for(dict[str, int])(b'{"a": 1}') == {"a": 1}
    with pytest.raises(PayloadError):
        decoder_for(dict[str, int])(b'{"a": "x"}')


def test_the_decoder_is_built_once_and_reused() -> None:
    decode = decoder_for(Order)
    assert decode(b'{"order_id": "1"}').order_id == "1"
    assert decode(b'{"order_id": "2"}').order_id == "2"


# --------------------------------------------------------------------- encode


def test_encode_bytes_like_values_as_is() -> None:
    assert encode(b"\x00\xff") == b"\x00\xff"
    assert encode(bytearray(b"ab")) == b"ab"
    assert encode(memoryview(b"cd")) == b"cd"


def test_encode_str_as_utf8_and_none_as_empty() -> None:
    assert encode("café") == "café".encode()
    assert encode(None) == b""


def test_encode_containers_models_and_dataclasses_as_json() -> None:
    assert encode({"a": [1, 2.5, None, True]}) == b'{"a":[1,2.5,null,true]}'
    assert encode([1, "x"]) == b'[1,"x"]'
    assert encode(Order(order_id="o1", items=[Item(sku="a", qty=1)])) == (
        b'{"order_id":"o1","items":[{"sku":"a","qty":1}]}'
    )
    assert encode(Point(1, 2)) == b'{"x":1,"y":2}'
    assert encode([Item(sku="a", qty=1)]) == b'[{"sku":"a","qty":1}]'
    assert encode(7) == b"7"


def test_encode_datetimes_as_iso_8601() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert encode({"at": when}) == b'{"at":"2024-05-01T12:00:00Z"}'


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (Order, Order(order_id="o1", items=[Item(sku="a", qty=1)])),
        (Point, Point(3, 4)),
        (list[Item], [Item(sku="z", qty=9)]),
        (dict, {"nested": {"list": [1, 2]}}),
        (str, "text ☕"),
        (bytes, b"\x01\x02"),
    ],
)
def test_what_encode_writes_the_matching_decoder_reads(annotation: Any, value: Any) -> None:
    assert decoder_for(annotation)(encode(value)) == value

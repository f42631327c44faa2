"""Payload codec chosen by type annotation.

A handler's first parameter annotation decides how the incoming bytes are
decoded: ``bytes`` (as is), ``str`` (UTF-8), ``dict`` / ``list`` (a JSON
object / array; any other JSON is a :class:`PayloadError`), ``Any`` or no
annotation (any JSON), a pydantic model or a dataclass (JSON validated into it),
or any other type pydantic can validate from JSON. Return values are encoded by
their runtime type with the same rules. The decoder is built once per function
load; per message it is a single call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pydantic
import pydantic_core

from fnhost_sdk.errors import PayloadError

Decoder = Callable[[bytes], Any]


def _decode_bytes(data: bytes) -> bytes:
    return data


def _decode_str(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not UTF-8 text: {exc}") from exc


def _decode_json(data: bytes) -> Any:
    try:
        return pydantic_core.from_json(data)
    except ValueError as exc:
        raise PayloadError(f"payload is not JSON: {exc}") from exc


def _json_of_shape(shape: type[dict[Any, Any]] | type[list[Any]]) -> Decoder:
    """JSON that must be an object (``dict``) or an array (``list``): a handler never
    receives the other shape, which is bad input rather than a handler failure."""
    expected = "an object" if shape is dict else "an array"

    def decode(data: bytes) -> Any:
        value = _decode_json(data)
        if type(value) is not shape:
            raise PayloadError(f"payload is JSON but not {expected}: got {_json_kind(value)}")
        return value

    return decode


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def decoder_for(annotation: Any) -> Decoder:
    """Return the decoder for a parameter annotation (``inspect.Parameter.empty`` = JSON)."""
    if annotation is bytes:
        return _decode_bytes
    if annotation is str:
        return _decode_str
    if annotation in (inspect.Parameter.empty, Any, object):
        return _decode_json
    if annotation is dict or annotation is list:
        return _json_of_shape(annotation)
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        model = annotation

        def decode_model(data: bytes) -> Any:
            try:
                return model.model_validate_json(data)
            except pydantic.ValidationError as exc:
                raise PayloadError(_describe(model.__name__, exc)) from exc

        return decode_model
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(annotation)
    name = getattr(annotation, "__name__", str(annotation))

    def decode_typed(data: bytes) -> Any:
        try:
            return adapter.validate_json(data)
        except pydantic.ValidationError as exc:
            raise PayloadError(_describe(name, exc)) from exc

    return decode_typed


def _describe(type_name: str, exc: pydantic.ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or '<root>'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )
    return f"payload does not fit {type_name}: {problems}"


def encode(value: Any) -> bytes:
    """Encode a value for the wire: bytes as is, str as UTF-8, ``None`` as empty, else JSON."""
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    # pydantic-core serialises models, dataclasses and plain containers alike.
    return pydantic_core.to_json(value)

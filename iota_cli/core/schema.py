"""The one loader of typed plain data: dicts from TOML, JSON or the wire into pydantic dataclasses and back.

Every config and manifest is parsed here once, at the edge, and then passed on as its type:
    from iota_cli.core.schema import parse, dump
    cfg = parse(ModelConfig, {"d_model": 64, "unknown": 1})   # unknown keys are ignored
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")


class SchemaError(ValueError):
    """Data that does not fit its type; the message names each bad field by its dotted path."""


_adapters: dict[type, TypeAdapter[Any]] = {}


def _adapter(kind: type) -> TypeAdapter[Any]:
    if kind not in _adapters:  # building an adapter costs a schema; reuse it
        _adapters[kind] = TypeAdapter(kind)
    return _adapters[kind]


def parse(kind: type[T], data: Any) -> T:
    """Validate data into kind, or raise SchemaError saying which fields are wrong and why."""
    try:
        return _adapter(kind).validate_python(data)  # type: ignore[no-any-return]
    except ValidationError as e:
        raise SchemaError(describe(e)) from None


def dump(obj: Any) -> dict[str, Any]:
    """The JSON-ready dict of a typed object (tuples become lists)."""
    return dict(_adapter(type(obj)).dump_python(obj, mode="json"))


def describe(e: ValidationError) -> str:
    """'train.seq_len: Input should be greater than or equal to 1; ...' (value errors keep their words)."""
    parts = []
    for err in e.errors(include_url=False):
        where = ".".join(str(x) for x in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)

"""Typed reads of a run's JSON files for what renders them (`kesi status`, a method's status line): a field
that is missing or of another type is a `FieldError` naming it, never a crash further on."""

from __future__ import annotations

__all__ = ["FieldError", "get_field"]

_KIND_NAMES = {dict: "mapping", list: "list", str: "string", int: "whole number", float: "number"}


class FieldError(Exception):
    """Field `field` of a file is missing or has the wrong type."""

    def __init__(self, field: str, what: str):
        super().__init__(f"{field}: {what}")


def get_field(obj, key: str, kind: type, where: str, required: bool = True):
    """obj[key] checked to be `kind` (a number is int or float, never bool); None when optional and absent.
    `where` is the dotted path of `obj` in its file, for the error."""
    field = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise FieldError(where or "(top level)", f"a {type(obj).__name__}, expected a mapping")
    value = obj.get(key)
    if value is None:
        if required:
            raise FieldError(field, "missing")
        return None
    kinds = (int, float) if kind is float else kind
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kinds):
        raise FieldError(field, f"{value!r} is a {type(value).__name__}, expected a {_KIND_NAMES[kind]}")
    return value

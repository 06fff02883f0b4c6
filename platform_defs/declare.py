"""The Python way to declare: ``dataset(...)``, ``model(...)``, ``endpoint(...)``, ``app(...)``.

Each returns a validated spec or raises a ``DeclarationError`` naming the declaration and field.
A declarations module lists what it declares in ``DECLARATIONS``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from platform_defs.specs import AppSpec, DatasetSpec, EndpointSpec, ModelSpec, parse_declaration


def _source() -> str | None:
    # the caller of dataset()/model()/...: its code's file (inspect.stack() would read every frame's source)
    filename = sys._getframe(2).f_code.co_filename
    try:
        return os.path.relpath(filename)
    except ValueError:
        return filename


def dataset(**fields: Any) -> DatasetSpec:
    return parse_declaration({"kind": "dataset", **fields}, _source())  # type: ignore[return-value]


def model(**fields: Any) -> ModelSpec:
    return parse_declaration({"kind": "model", **fields}, _source())  # type: ignore[return-value]


def endpoint(**fields: Any) -> EndpointSpec:
    return parse_declaration({"kind": "endpoint", **fields}, _source())  # type: ignore[return-value]


def app(**fields: Any) -> AppSpec:
    return parse_declaration({"kind": "app", **fields}, _source())  # type: ignore[return-value]

"""A TOML writer for the shapes our configuration uses (tests only)."""

from __future__ import annotations

import json
import re


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value")


def _key(k: str) -> str:
    """A bare key, or a quoted one (a group DN as a [tenant.ldap.roles] key)."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _is_table_array(v) -> bool:
    return isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v)


def dumps(doc: dict, prefix: str = "") -> str:
    out = []
    for k, v in doc.items():
        if not isinstance(v, dict) and not _is_table_array(v):
            out.append(f"{_key(k)} = {_value(v)}")
    for k, v in doc.items():
        name = f"{prefix}.{_key(k)}" if prefix else _key(k)
        if isinstance(v, dict):
            out.append(f"\n[{name}]")
            out.append(dumps(v, name))
        elif _is_table_array(v):
            for item in v:
                out.append(f"\n[[{name}]]")
                out.append(dumps(item, name))
    return "\n".join(x for x in out if x != "")

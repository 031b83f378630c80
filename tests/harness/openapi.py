"""Every API answer a test gets, checked against openapi.json.

    from tests.harness.openapi import check
    check("GET", "/api/v1/search?q=x", status, content_type, body)

finds the operation for the path (templated paths match any segment), the
response for the status (else the operation's "default"), the media type,
and validates a JSON body with jsonschema's Draft 2020-12 validator,
resolving the document's $refs.  A status or content type the document
does not describe for that operation fails the test.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jsonschema

DOC_PATH = Path(__file__).resolve().parents[2] / "daemon" / "mailtresor" / "access" / "openapi.json"


@functools.cache
def document() -> dict:
    """openapi.json with the API sections' openapi-<name>.json merged (what the daemon serves)."""
    from mailtresor.access.api import openapi_doc
    return json.loads(json.dumps(openapi_doc()))


@functools.cache
def _paths():
    out = []
    for template, item in document()["paths"].items():
        rx = re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + r"\Z")
        out.append((rx, template, item))
    return out


@functools.cache
def _resolver():
    return jsonschema.RefResolver.from_schema(document(), id_of=lambda _: "")


class Mismatch(AssertionError):
    pass


def operation(method: str, path: str) -> tuple[str, dict] | None:
    path = path.split("?", 1)[0]
    for rx, template, item in _paths():
        if rx.match(path):
            op = item.get(method.lower() if method != "HEAD" else "get")
            return (template, op) if op is not None else (template, None)
    return None


def check(method: str, path: str, status: int, content_type: str | None, body: bytes) -> None:
    """Raise Mismatch unless the answer is one openapi.json describes."""
    found = operation(method, path)
    if found is None or found[1] is None:
        # Unknown paths and methods: the documented error format still holds.
        response = document()["components"]["responses"]["Error"]
        where = f"{method} {path} (not in the document)"
    else:
        template, op = found
        responses = op["responses"]
        response = responses.get(str(status)) or responses.get("default")
        where = f"{method} {template} {status}"
        if response is None:
            raise Mismatch(f"{where}: status not described")
        if "$ref" in response:
            response = document()["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    content = response.get("content")
    if not content:
        return                              # e.g. 416: no body described
    if method == "HEAD":
        return
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    media = content.get(ctype) or content.get("*/*")
    if media is None:
        raise Mismatch(f"{where}: content type {ctype!r} not described (only {', '.join(content)})")
    schema = media.get("schema", {})
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise Mismatch(f"{where}: body is not JSON ({e}): {body[:200]!r}") from None
        validator = jsonschema.Draft202012Validator(schema, resolver=_resolver())
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            raise Mismatch(f"{where}: {errors[0].message} at {list(errors[0].path)}; body {body[:300]!r}")
    elif schema.get("type") == "string" and schema.get("format") != "binary":
        body.decode("utf-8")              # text must be UTF-8
        if "const" in schema and body.decode() != schema["const"]:
            raise Mismatch(f"{where}: body {body[:100]!r} is not {schema['const']!r}")


def check_document() -> None:
    """openapi.json itself: every schema is a valid 2020-12 schema and every
    $ref resolves."""
    doc = document()
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(doc))
    for ref in refs:
        node = doc
        for part in ref.split("/"):
            node = node[part]

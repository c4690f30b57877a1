"""Extract the response schemas the OpenAI conformance tests validate against from OpenAI's published OpenAPI
document, into ``tests/openai_schemas.json``.

    python scripts/vendor_openai_schemas.py PATH/TO/openai-openapi/openapi.json COMMIT

``PATH`` is ``openapi.json`` from a checkout of https://github.com/openai/openai-openapi and ``COMMIT`` the commit
it was read at (written into the output, with the repository and path, so the file names its source). Only the
named roots and every schema they reference are kept, as they are, less their prose (``description``, ``example``,
``x-oaiMeta``), which validation never reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)
# The request bodies, for the names of the fields each endpoint defines (tests check every one is honoured or
# refused by name).
REQUESTS = ("CreateChatCompletionRequest", "CreateCompletionRequest", "CreateEmbeddingRequest")
PROSE = {"description", "example", "examples", "x-oaiMeta"}
OUT = Path(__file__).resolve().parents[1] / "tests" / "openai_schemas.json"


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"].rsplit("/", 1)[-1]] if isinstance(node.get("$ref"), str) else []
        return found + [name for value in node.values() for name in refs(value)]
    if isinstance(node, list):
        return [name for value in node for name in refs(value)]
    return []


def without_prose(node: Any, naming: bool = False) -> Any:
    """``node`` less its prose keys; ``naming``: ``node`` is a ``properties`` map, whose keys are field names (a
    field may well be called ``description``)."""
    if isinstance(node, dict):
        return {
            key: without_prose(value, naming=key == "properties" and not naming)
            for key, value in node.items()
            if naming or key not in PROSE
        }
    if isinstance(node, list):
        return [without_prose(value) for value in node]
    return node


def request_fields(schemas: dict[str, Any], name: str) -> list[str]:
    """Every property a request schema defines, through its ``allOf`` parts."""
    schema, fields = schemas[name], []
    for part in schema.get("allOf", [schema]):
        if "$ref" in part:
            fields += request_fields(schemas, part["$ref"].rsplit("/", 1)[-1])
        else:
            fields += list(part.get("properties", {}))
    return sorted(set(fields))


def main(path: str, commit: str) -> None:
    spec = json.loads(Path(path).read_text())
    schemas = spec["components"]["schemas"]
    kept: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in kept:
            kept[name] = without_prose(schemas[name])
            todo += refs(schemas[name])
    out = {
        "source": {
            "repository": "https://github.com/openai/openai-openapi",
            "path": "openapi.json",
            "commit": commit,
            "openapi": spec.get("openapi"),
            "info_version": spec.get("info", {}).get("version"),
            "extracted_by": "scripts/vendor_openai_schemas.py",
            "note": "components.schemas of the roots and what they reference, prose removed",
        },
        "roots": list(ROOTS),
        "request_fields": {name: request_fields(schemas, name) for name in REQUESTS},
        "components": {"schemas": dict(sorted(kept.items()))},
    }
    OUT.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(f"{OUT}: {len(kept)} schemas, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:3])

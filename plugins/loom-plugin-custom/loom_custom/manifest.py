"""The manifest: what a loom.json in a model directory, or a ``custom_models`` entry of the server config, says
about a model. Reading it imports nothing (no torch, no factory code).

Every problem is a ``BadModel`` whose ``field`` is the manifest field at fault and whose ``manifest`` says which
manifest it is (``/data/toy/loom.json`` or ``custom_models.toy``), so a typo never falls back to a default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import attrs

from loom_kernel import BadModel, ModelRef, ProbeResult, Unsupported

NAME = "custom"
FIELDS = (
    "factory",
    "kwargs",
    "blocks",
    "num_layers",
    "final_norm",
    "hidden_size",
    "kind",
    "tokenizer",
    "weights",
    "max_context",
    "path",
)
KINDS = ("causal", "encoder")
# "package.module:function" or "module:Class.method": an importable module, then an attribute path in it.
TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# An attribute path into the built module; numeric parts index a ModuleList/Sequential ("encoder.0.layers").
ATTRIBUTE_PATH = re.compile(r"^\w+(\.\w+)*$")
# Weight files looked for when the manifest names none, in this order.
DEFAULT_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pt")

Origin = Literal["config", "checkpoint"]


@attrs.define(frozen=True)
class Manifest:
    """A checked manifest. ``origin`` is who wrote it: "config" (the server's operator, in the config file) or
    "checkpoint" (a loom.json that came with the model); it decides what code may run (see ``code.py``)."""

    factory: str
    origin: Origin
    where: str
    directory: Path | None
    kwargs: dict[str, Any] = attrs.field(factory=dict)
    blocks: str | None = None
    num_layers: int | None = None
    final_norm: str | None = None
    hidden_size: int | None = None
    kind: str = "causal"
    tokenizer: str | None = None
    weights: str | None = None
    max_context: int | None = None

    def error(self, field: str, detail: str, **extra: Any) -> BadModel:
        return BadModel(f"model: {self.where}: {field} {detail}", field=field, manifest=self.where, **extra)

    def local_file(self, field: str, value: str) -> Path:
        """A file the manifest names, relative to the model directory. A checkpoint's manifest may not reach
        outside its own directory (no absolute paths, no ".."); the operator's config may name any path."""
        if self.origin == "config":
            given = Path(value).expanduser()
            if given.is_absolute():
                return given
        elif Path(value).is_absolute() or _escapes(value):
            raise self.error(field, f"{value!r} must be a path inside the model directory")
        if self.directory is None:
            raise self.error(field, f"{value!r} is a relative path, but no model directory is named (set path)")
        return self.directory / os.path.normpath(value)

    def weights_file(self) -> Path | None:
        """The weights to load: the named file (which must exist), else the first default present, else None."""
        if self.weights is not None:
            path = self.local_file("weights", self.weights)
            if not path.is_file():
                raise self.error("weights", f"{self.weights!r}: no such file {path}")
            return path
        if self.directory is None:
            return None
        return next((self.directory / n for n in DEFAULT_WEIGHTS if (self.directory / n).is_file()), None)


def _escapes(value: str) -> bool:
    norm = os.path.normpath(value)
    return norm == ".." or norm.startswith("../") or norm.startswith("..\\")


def _where(ref: ModelRef) -> str:
    if ref.source == "config":
        return f"custom_models.{ref.id}"
    return f"{ref.path}/loom.json" if ref.path is not None else "loom.json"


def probe_manifest(ref: ModelRef) -> ProbeResult | None:
    """Score 1.0 (an exact format marker) for a loom.json or a custom_models entry, whatever it holds: a broken
    manifest is still this loader's to load, so that the error names the field instead of another loader guessing."""
    if ref.source == "config" and isinstance(ref.manifest, dict):
        what = "custom_models entry of the server config"
    elif ref.manifest is not None or "loom.json" in ref.files:
        what = "loom.json manifest"
    else:
        return None
    factory = ref.manifest.get("factory") if isinstance(ref.manifest, dict) else None
    detail = f"factory {factory!r}" if isinstance(factory, str) else "no valid factory: loading will say why"
    return ProbeResult(loader=NAME, score=1.0, reason=f"{what} ({detail})")


def read_manifest(ref: ModelRef) -> Manifest:
    """The checked manifest of ``ref``; BadModel naming the field for anything malformed."""
    where = _where(ref)
    origin: Origin = "config" if ref.source == "config" else "checkpoint"
    raw = ref.manifest
    if raw is None and "loom.json" not in ref.files:
        raise Unsupported(
            f"loader: {NAME!r} loads models with a loom.json manifest or a custom_models entry in the server config; "
            f"{ref.id!r} has neither",
            field="loader",
        )
    if not isinstance(raw, dict):
        raise BadModel(f"model: {where} is not a JSON object of manifest fields", field="manifest", manifest=where)
    unknown = sorted(k for k in raw if k not in FIELDS or (k == "path" and origin == "checkpoint"))
    if unknown:
        allowed = [f for f in FIELDS if origin == "config" or f != "path"]
        raise BadModel(
            f"model: {where}: unknown field {unknown[0]!r}", field=unknown[0], manifest=where, allowed=allowed
        )

    def bad(field: str, detail: str) -> BadModel:
        return BadModel(f"model: {where}: {field} {detail}", field=field, manifest=where)

    factory = raw.get("factory")
    if factory is None:
        raise bad("factory", "is missing: name the function that builds the model, as 'module:function'")
    if not isinstance(factory, str) or not TARGET.match(factory):
        raise bad("factory", f"{factory!r} is not 'module:function' (e.g. 'my_arch.modeling:build')")
    kwargs = raw.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise bad("kwargs", f"{kwargs!r} must be an object of keyword arguments for the factory")
    for field in ("blocks", "final_norm"):
        value = raw.get(field)
        if value is not None and (not isinstance(value, str) or not ATTRIBUTE_PATH.match(value)):
            raise bad(field, f"{value!r} must be an attribute path into the model, e.g. 'layers' or 'encoder.blocks'")
    for field in ("num_layers", "hidden_size", "max_context"):
        value = raw.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(field, f"{value!r} must be a positive integer")
    kind = raw.get("kind", "causal")
    if kind not in KINDS:
        raise BadModel(f"model: {where}: kind {kind!r} is unknown", field="kind", manifest=where, allowed=list(KINDS))
    for field in ("tokenizer", "weights", "path"):
        value = raw.get(field)
        if value is not None and (not isinstance(value, str) or not value):
            raise bad(field, f"{value!r} must be a non-empty string")
    return Manifest(
        factory=factory,
        origin=origin,
        where=where,
        directory=ref.path,
        kwargs=dict(kwargs),
        blocks=raw.get("blocks"),
        num_layers=raw.get("num_layers"),
        final_norm=raw.get("final_norm"),
        hidden_size=raw.get("hidden_size"),
        kind=kind,
        tokenizer=raw.get("tokenizer"),
        weights=raw.get("weights"),
        max_context=raw.get("max_context"),
    )

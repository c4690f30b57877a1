"""Tokenizers for custom models, all seen by the kernel through one interface (what transformers' have):

- ``tok(text, add_special_tokens=True, truncation=False, max_length=None)`` -> a mapping with ``input_ids``
- ``tok.decode(ids)`` -> str (a token's text in answers is the decode of its id alone)

The manifest's ``tokenizer`` may be ``"bytes"`` (UTF-8 bytes as ids 0..255), a ``tokenizer.json`` file of the
``tokenizers`` library, a directory or hub name for transformers' AutoTokenizer, or a "module:function" factory
(whose code the same trust rule as the model's factory governs). A factory may also return ``(model, tokenizer)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loom_custom.code import load_callable
from loom_custom.manifest import TARGET, Manifest
from loom_kernel import MissingBackend


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: no vocabulary file and no special tokens; enough for a toy architecture."""

    vocab_size = 256
    pad_token_id = None
    eos_token_id = None
    padding_side = "right"

    def __call__(
        self, text: str, add_special_tokens: bool = True, truncation: bool = False, max_length: int | None = None
    ) -> dict[str, list[int]]:
        ids = list(text.encode("utf-8"))
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TokenizersAdapter:
    """A ``tokenizers.Tokenizer`` (a tokenizer.json) behind the interface above."""

    padding_side = "right"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_token_id = tokenizer.padding["pad_id"] if tokenizer.padding else None
        self.eos_token_id = None

    def __call__(
        self, text: str, add_special_tokens: bool = True, truncation: bool = False, max_length: int | None = None
    ) -> dict[str, list[int]]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def adapt(manifest: Manifest, tokenizer: Any) -> Any:
    """``tokenizer`` behind the kernel's interface; BadModel naming ``tokenizer`` when it cannot be."""
    try:
        import tokenizers

        if isinstance(tokenizer, tokenizers.Tokenizer):
            return TokenizersAdapter(tokenizer)
    except ImportError:  # then it cannot be a tokenizers.Tokenizer either
        pass
    if not callable(tokenizer) or not callable(getattr(tokenizer, "decode", None)):
        raise manifest.error(
            "tokenizer",
            f"the factory's tokenizer ({type(tokenizer).__name__}) needs __call__(text, add_special_tokens=...) "
            "returning input_ids, and decode(ids)",
        )
    # Called once here as every request will call it: a tokenizer off the interface is the manifest's fault, named
    # at load (422), not a 500 on each request to a model that loaded.
    try:
        ids = [int(i) for i in tokenizer("a", add_special_tokens=False)["input_ids"]]
        tokenizer.decode(ids)
    except Exception as exc:  # TypeError (no such argument), KeyError/IndexError (no input_ids), ...
        raise manifest.error(
            "tokenizer",
            f"the factory's tokenizer ({type(tokenizer).__name__}) does not follow the interface "
            f"__call__(text, add_special_tokens=...) returning input_ids, and decode(ids): {type(exc).__name__}: "
            f"{exc}",
        ) from exc
    return tokenizer


def call_factory(factory: Callable[..., Any], kwargs: dict[str, Any], directory: Path | None) -> Any:
    """``factory(**kwargs)``, plus ``model_dir=directory`` when the factory declares that parameter."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature: call it as it is
        params = {}
    if "model_dir" in params:
        return factory(**kwargs, model_dir=directory)
    return factory(**kwargs)


def _auto_tokenizer(manifest: Manifest, target: str, trust_remote_code: bool) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingBackend(
            f"model: {manifest.where}: tokenizer {target!r} needs transformers; pip install transformers",
            field="tokenizer",
        ) from None
    try:
        return AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a missing or unreadable tokenizer: one clear error naming the field
        raise manifest.error("tokenizer", f"{target!r}: transformers could not load it: {exc}") from exc


def _tokenizer_file(manifest: Manifest, path: Path) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise MissingBackend(
            f"model: {manifest.where}: tokenizer {path.name!r} needs the tokenizers library; pip install tokenizers",
            field="tokenizer",
        ) from None
    try:
        return TokenizersAdapter(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as exc:  # not a tokenizer.json
        raise manifest.error("tokenizer", f"{path}: not a tokenizers file: {exc}") from exc


def load_tokenizer(manifest: Manifest, trust_remote_code: bool) -> Any:
    """The tokenizer the manifest names; without a ``tokenizer`` field, one found in the model directory
    (tokenizer.json, else a transformers tokenizer_config.json)."""
    name = manifest.tokenizer
    directory = manifest.directory
    if name is None:
        if directory is not None and (directory / "tokenizer.json").is_file():
            return _tokenizer_file(manifest, directory / "tokenizer.json")
        if directory is not None and (directory / "tokenizer_config.json").is_file():
            return _auto_tokenizer(manifest, str(directory), trust_remote_code)
        raise manifest.error(
            "tokenizer",
            'is missing: name one ("bytes", a tokenizer.json, a directory or hub name, or "module:function"), or '
            "let the factory return (model, tokenizer)",
        )
    if name == "bytes":
        return ByteTokenizer()
    if TARGET.match(name):
        factory = load_callable(manifest, "tokenizer", name, trust_remote_code)
        try:
            made = call_factory(factory, {}, directory)
        except Exception as exc:  # the factory's own failure, named
            raise manifest.error("tokenizer", f"{name!r} raised {type(exc).__name__}: {exc}") from exc
        return adapt(manifest, made)
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".json") or manifest.origin == "checkpoint"
    path = manifest.local_file("tokenizer", name) if looks_local or directory is not None else None
    if path is not None and path.is_file():
        return _tokenizer_file(manifest, path)
    if path is not None and path.is_dir():
        return _auto_tokenizer(manifest, str(path), trust_remote_code)
    if name.startswith((".", "/", "~")) or name.endswith(".json"):
        raise manifest.error("tokenizer", f"{name!r}: no such file or directory ({path})")
    return _auto_tokenizer(manifest, name, trust_remote_code)  # a hub name, from the local cache when offline

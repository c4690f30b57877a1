"""Settings: defaults < config file (--config, LOOM_CONFIG, ~/.config/loom/config.yaml) < environment < CLI."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from loom_kernel.errors import BadRequest


def default_device() -> str:
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except Exception:  # a broken CUDA driver should not stop the server starting on CPU
        return "cpu"


@attrs.define
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # None: the unix transport's default, $XDG_RUNTIME_DIR/loom.sock or a private directory of this user's.
    unix_socket: str | None = None
    transports: list[str] = attrs.field(factory=lambda: ["http"])
    max_models: int = 3
    auto_unload_minutes: float = 20.0
    default_device: str = "auto"
    memory_fraction: float = 0.9
    default_dtype: str = "auto"
    preload: list[str] = attrs.field(factory=list)
    allowed_paths: list[str] | None = None
    trust_remote_code: bool = False
    aliases: dict[str, str] = attrs.field(factory=dict)
    # id -> manifest (the fields of a loom.json, plus "path"): architectures a loader plugin builds from a factory.
    custom_models: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    default_layers: list[int] = attrs.field(factory=lambda: [-1])
    default_precision: str = "float32"
    default_format: str = "list"
    max_tokens_limit: int = 4096
    # Batching per model (loom_kernel.batching) and backpressure.
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    max_queue: int = 64
    request_timeout: float = 600.0
    # Security: an API key every endpoint but /health needs; origins allowed cross-origin (None: CORS off);
    # the largest request body accepted (413 beyond).
    api_key: list[str] | None = None  # one key, or several (a lab): each key's stored names are its own
    cors_origins: list[str] | None = None
    max_body_mb: float = 10.0
    # Host names besides loopback and the bound address that requests may be addressed to ("*": any); the largest
    # answer a request may ask for, estimated from its shapes before any work; whether a request's own
    # trust_remote_code is honoured (otherwise only the server's models.trust_remote_code counts).
    allowed_hosts: list[str] = attrs.field(factory=list)
    max_response_mb: float = 256.0
    allow_remote_code_requests: bool = False
    log_level: str = "info"
    hf_token: str | None = None
    config_file: str | None = None
    # Plugins' own settings (``Option``), by ``Option.name``: only those given; ``Option.of`` adds the default.
    options: dict[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        # max_models: the manager keeps the model just loaded whatever the bound, and Ray's multiplexing refuses 0
        # and reads -1 as no bound: below 1 is a mistake to name, not a value to guess at.
        for name in ("max_batch_size", "max_batch_tokens", "max_models"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1", field=name)
        for name in ("max_body_mb", "max_response_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be more than 0", field=name)
        for name in ("max_queue", "request_timeout", "auto_unload_minutes"):
            if not getattr(self, name) >= 0:  # NaN too: it compares false with everything, so no timer would fire
                raise ConfigError(f"{name}: must not be negative (0 turns it off)", field=name)
        for name in ("request_timeout", "auto_unload_minutes", "max_body_mb", "max_response_mb"):
            if not math.isfinite(getattr(self, name)):  # 0 turns a limit off; a size of infinity crashed the start
                raise ConfigError(f"{name}: must be a finite number", field=name)
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError("memory_fraction: must be more than 0 and at most 1", field="memory_fraction")
        if self.max_tokens_limit < 0:
            raise ConfigError("max_tokens_limit: must not be negative", field="max_tokens_limit")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.default_device):
            raise ConfigError(
                f"default_device: unknown device {self.default_device!r}; one of auto, cpu, cuda, cuda:N (or a GPU "
                "index N)",
                field="default_device",
                allowed=["auto", "cpu", "cuda", "cuda:N"],
            )
        # Checked per request as well, but a server whose default no request can use should not start.
        from loom_kernel.devices import LOAD_DTYPES
        from loom_kernel.encoding import DTYPES, FORMATS

        for name, value, allowed in (
            ("default_dtype", self.default_dtype, LOAD_DTYPES),
            ("default_precision", self.default_precision, DTYPES),
            ("default_format", self.default_format, FORMATS),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"{name}: unknown value {value!r}; one of {', '.join(allowed)}", field=name, allowed=list(allowed)
                )
        both = sorted(set(self.aliases) & set(self.custom_models))
        if both:
            raise ConfigError(
                f"models.aliases and custom_models both name {both[0]!r}; a model id may be only one of them",
                field="custom_models",
            )

    def device(self) -> str:
        return default_device() if self.default_device == "auto" else self.default_device


@attrs.frozen
class Option:
    """A plugin's own setting: ``section.key`` in the config file, ``LOOM_<SECTION>_<KEY>`` in the environment and,
    with a ``flag``, ``loom serve --flag``; its type is its default's (a None default: text)."""

    section: str
    key: str
    default: Any
    help: str
    flag: str | None = None
    minimum: float | None = None

    @property
    def name(self) -> str:
        return f"{self.section}_{self.key}"

    def of(self, settings: Settings) -> Any:
        """This option's value in ``settings``: given, or the default."""
        return settings.options.get(self.name, self.default)

    def coerce(self, value: Any, source: str) -> Any:
        kind = "str" if self.default is None or value is None else type(self.default).__name__
        try:
            out = _scalar(kind, value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source}: bad value {value!r} for {self.name}: must be {KINDS.get(kind, kind)}", field=self.name
            ) from None
        if self.minimum is not None and out is not None and out < self.minimum:
            raise ConfigError(f"{source}: {self.name} must be at least {self.minimum:g}", field=self.name)
        return out


def _same(names: str) -> dict[str, str]:
    return {name: name for name in names.split()}


# config file section.key -> Settings attribute ("": accepted and ignored)
FILE_KEYS: dict[str, dict[str, str]] = {
    "server": {
        **_same("host port unix_socket transports log_level request_timeout api_key cors_origins max_body_mb"),
        **_same("max_response_mb allowed_hosts"),
        "http_port": "port",
    },
    "gpu": {**_same("default_device memory_fraction"), "devices": ""},
    "models": {
        **_same("auto_unload_minutes default_dtype preload allowed_paths trust_remote_code aliases max_tokens_limit"),
        **_same("allow_remote_code_requests"),
        "max_loaded": "max_models",
    },
    "hidden_states": {**_same("default_layers default_format"), "precision": "default_precision"},
    # window_ms: nothing waits for company any more; older config files still load.
    "batching": {**_same("max_batch_size max_batch_tokens max_queue"), "window_ms": ""},
    # Keys are the user's model ids, not fixed names: the section is read whole into one setting (SECTIONS).
    "custom_models": {},
}
# Sections whose keys the user chooses, each read whole into one Settings attribute.
SECTIONS: dict[str, str] = {"custom_models": "custom_models"}

# LOOM_<SETTING> for these settings, and two names of their own.
ENV_KEYS: dict[str, str] = {
    **{
        f"LOOM_{name.upper()}": name
        for name in _same(
            "host port unix_socket max_models auto_unload_minutes default_device memory_fraction preload log_level "
            "max_batch_size max_batch_tokens max_queue request_timeout api_key cors_origins max_body_mb "
            "max_response_mb allowed_hosts"
        )
    },
    "LOOM_TRANSPORT": "transports",
    "HF_TOKEN": "hf_token",
}


class ConfigError(BadRequest):
    title = "Configuration error"


def _coerce(name: str, value: Any, source: str) -> Any:
    field = attrs.fields_dict(Settings)[name]
    kind = str(field.type)
    try:
        if name == "default_device" and isinstance(value, int):
            return f"cuda:{value}"
        if name == "custom_models":
            return _manifests(value, source)
        if "list[" in kind:
            if value is None and "None" in kind:
                return None
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if name == "transports" and "both" in value:
                value = [v for v in value if v != "both"] + ["http", "unix"]
            # An operator who sets a key means to require one: an empty one (`LOOM_API_KEY=$KEY` with $KEY unset, a
            # key left blank) would serve every request without a key, or let in one that sends an empty key.
            if name == "api_key" and (not value or any(not str(v).strip() for v in value)):
                raise ConfigError(
                    f"{source}: the API key is empty; set the key (several: a list, or comma-separated), or leave "
                    "api_key unset (null) to serve without one",
                    field=name,
                )
            return [int(v) for v in value] if name == "default_layers" else [str(v) for v in value]
        if kind.startswith("dict"):
            return {str(k): str(v) for k, v in dict(value).items()}
        return _scalar(kind, value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad value {value!r} for {name}: {exc}", field=name) from None


TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
# What a value of each kind must be, as an error says it.
KINDS = {
    "int": "an integer",
    "float": "a finite number",
    "bool": "a boolean: true or false (also yes/no, on/off, 1/0)",
    "str": "text",
}


def _scalar(kind: str, value: Any) -> Any:
    """``value`` (from YAML, the environment or a flag) as an int, float or bool, or as text (None stays None)."""
    if kind == "int":
        return int(value)
    if kind == "float":
        out = float(value)
        if not math.isfinite(out):  # no setting means anything by NaN or infinity; 0 is how one turns a limit off
            raise ValueError(f"must be {KINDS[kind]}")
        return out
    if kind == "bool":
        if isinstance(value, bool):
            return value
        # Anything else is a typo ("ture") that must not quietly read as false.
        text = str(value).strip().lower()
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise ValueError(f"must be {KINDS[kind]}")
    return None if value is None else str(value)


def _manifests(value: Any, source: str) -> dict[str, dict[str, Any]]:
    """custom_models: model id -> a mapping of manifest fields. The fields themselves are the loader plugin's to
    check (loom-plugin-custom names a bad one when the model loads); here only the shape is."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: must map model ids to manifests", field="custom_models")
    out: dict[str, dict[str, Any]] = {}
    for model_id, manifest in value.items():
        if not isinstance(manifest, dict) or not all(isinstance(k, str) for k in manifest):
            raise ConfigError(
                f"{source}: the entry for {model_id!r} must be a mapping of manifest fields (factory, path, ...)",
                field=f"custom_models.{model_id}",
            )
        out[str(model_id)] = dict(manifest)
    return out


def read_config_file(path: Path, options: Sequence[Option] = ()) -> dict[str, Any]:
    """The file's settings; plugins' ``options`` land in ``options``, by name."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        # The operator's to fix, like an unknown key: one line naming the file, not a traceback. A YAML error's
        # first line says what it met; its "in <unicode string>" lines name a string, not the file.
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None)
        raise ConfigError(
            f"config file {path} cannot be read as YAML: {problem or reason}{at}", field="config"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    keys = {section: dict(keys) for section, keys in FILE_KEYS.items()}
    declared = {(o.section, o.key): o for o in options}
    for section, key in declared:
        keys.setdefault(section, {})[key] = ""
    out: dict[str, Any] = {}
    for section, values in data.items():
        if section not in keys:
            raise ConfigError(
                f"{path}: unknown section {section!r} (known: {', '.join(sorted(keys))}; a plugin's section needs the "
                "plugin installed)",
                field=section,
                allowed=sorted(keys),
            )
        if section in SECTIONS:
            out[SECTIONS[section]] = _coerce(SECTIONS[section], values, f"{path}: {section}")
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping", field=section)
        for key, value in values.items():
            if key not in keys[section]:
                raise ConfigError(
                    f"{path}: unknown key {section}.{key} (known: {', '.join(sorted(keys[section]))})",
                    field=f"{section}.{key}",
                    allowed=sorted(keys[section]),
                )
            if option := declared.get((section, key)):
                out.setdefault("options", {})[option.name] = option.coerce(value, f"{path}: {section}.{key}")
                continue
            attr = FILE_KEYS[section][key]
            if attr:
                out[attr] = _coerce(attr, value, f"{path}: {section}.{key}")
    return out


def load_settings(
    config: str | None = None, env: dict[str, str] | None = None, options: Sequence[Option] = (), **cli: Any
) -> Settings:
    """``options``: the plugins' own settings (``plugin_options(pm)``); ``cli`` may set them by name too."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {"options": {}}
    path = config or env.get("LOOM_CONFIG")
    if path is None and (Path.home() / ".config/loom/config.yaml").exists():
        path = str(Path.home() / ".config/loom/config.yaml")
    if path is not None:
        if Path(path).is_dir():
            raise ConfigError(f"config file {path} is a directory, not a file", field="config")
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist", field="config")
        values.update(read_config_file(Path(path), options))
        values["config_file"] = str(path)
    for var, attr in ENV_KEYS.items():
        if env.get(var) not in (None, "") or (var in env and attr == "api_key"):  # an empty key: refused
            values[attr] = _coerce(attr, env[var], var)
    for option in options:
        if env.get(var := f"LOOM_{option.name.upper()}") not in (None, ""):
            values["options"][option.name] = option.coerce(env[var], var)
    named = {o.name: o for o in options}
    for attr, value in cli.items():
        if value is None or value == []:
            continue
        if attr in named:
            values["options"][attr] = named[attr].coerce(value, f"--{named[attr].flag}")
        else:
            values[attr] = _coerce(attr, value, f"--{attr.replace('_', '-')}")
    return Settings(**values)

"""Configuration: config.example.yaml, the precedence defaults < file < environment < CLI, unknown keys."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import yaml

from loom_kernel import Option, hookimpl
from loom_kernel.cli import build_parser, build_settings
from loom_kernel.config import ENV_KEYS, FILE_KEYS, ConfigError, Settings, load_settings
from loom_kernel.plugins import create_plugin_manager, plugin_options

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.yaml"


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the developer's ~/.config/loom/config.yaml nor their LOOM_* variables leak into these tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in [*ENV_KEYS, "LOOM_CONFIG"]:
        monkeypatch.delenv(var, raising=False)


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_example_shows_every_key_with_its_default() -> None:
    """The kernel's keys and those of the plugins dev.sh installs (their ``options`` hook)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    options = plugin_options(create_plugin_manager())
    keys = {section: set(names) for section, names in FILE_KEYS.items()}
    for option in options:
        keys.setdefault(option.section, set()).add(option.key)
    assert set(data) == set(keys)
    for section, names in keys.items():
        assert set(data[section]) == names, section
    loaded = load_settings(config=str(EXAMPLE), env={}, options=options)
    assert loaded.config_file == str(EXAMPLE)
    assert loaded.options == {o.name: o.default for o in options}
    assert attrs.evolve(loaded, config_file=None, options={}) == Settings()


def test_example_has_a_comment_for_every_key() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"no comment above {line.strip()!r}"


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    config = write(tmp_path, {"server": {"port": 9001, "host": "10.0.0.1"}, "models": {"max_loaded": 5}})
    env = {"LOOM_PORT": "9002", "LOOM_MAX_MODELS": "6"}

    assert load_settings(env={}).port == Settings().port == 8080
    from_file = load_settings(config=config, env={})
    assert (from_file.port, from_file.host, from_file.max_models) == (9001, "10.0.0.1", 5)
    from_env = load_settings(config=config, env=env)
    assert (from_env.port, from_env.host, from_env.max_models) == (9002, "10.0.0.1", 6)
    from_cli = load_settings(config=config, env=env, port=9003)
    assert (from_cli.port, from_cli.host, from_cli.max_models) == (9003, "10.0.0.1", 6)


def test_loom_config_variable_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path, {"server": {"unix_socket": "/run/loom.sock"}})
    assert load_settings(env={"LOOM_CONFIG": config}).unix_socket == "/run/loom.sock"


def test_cli_flags_win_and_preload_appends(tmp_path: Path) -> None:
    config = write(tmp_path, {"server": {"port": 9001}, "models": {"preload": ["a"]}, "gpu": {"default_device": 1}})
    flags = ["--port", "9003", "--transport", "both", "--preload", "b", "--preload", "a", "--device", "cpu"]
    flags += ["--max-models", "7", "--auto-unload-minutes", "0", "--log-level", "debug"]
    args = build_parser().parse_args(["serve", "--config", config, *flags])
    s = build_settings(args, env={"LOOM_PORT": "9002", "LOOM_PRELOAD": "a,c", "LOOM_DEFAULT_DEVICE": "cuda:0"})
    assert s.port == 9003
    assert s.transports == ["http", "unix"]
    assert s.preload == ["a", "c", "b"]  # env replaced the file's list; the flags added to it, once each
    assert (s.default_device, s.max_models, s.auto_unload_minutes, s.log_level) == ("cpu", 7, 0.0, "debug")


def test_cli_without_flags_keeps_file_and_env(tmp_path: Path) -> None:
    config = write(tmp_path, {"gpu": {"default_device": 1}, "models": {"auto_unload_minutes": 5}})
    s = build_settings(build_parser().parse_args(["serve", "--config", config]), env={"LOOM_HOST": "::1"})
    assert (s.default_device, s.auto_unload_minutes, s.host, s.port) == ("cuda:1", 5.0, "::1", 8080)


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    config = write(tmp_path, {"server": {"prot": 9001}})
    with pytest.raises(ConfigError, match=r"unknown key server\.prot") as exc:
        load_settings(config=config, env={})
    assert exc.value.field == "server.prot"
    assert "port" in exc.value.allowed


def test_unknown_section_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section 'severs'"):
        load_settings(config=write(tmp_path, {"severs": {"port": 1}}), env={})


@pytest.mark.parametrize("value", ["", "  ", ",", [], [""], ["k1", ""], ["k1", " "]])
def test_an_empty_api_key_in_the_file_is_an_error_naming_it(tmp_path: Path, value: object) -> None:
    config = write(tmp_path, {"server": {"api_key": value}})
    with pytest.raises(ConfigError, match=r"server\.api_key: .*empty") as exc:
        load_settings(config=config, env={})
    assert exc.value.field == "api_key"


@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_an_empty_api_key_variable_is_an_error_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match=r"LOOM_API_KEY: .*empty") as exc:
        load_settings(env={"LOOM_API_KEY": value})
    assert exc.value.field == "api_key"


def test_no_api_key_is_null_or_nothing(tmp_path: Path) -> None:
    assert load_settings(env={}).api_key is None
    assert load_settings(config=write(tmp_path, {"server": {"api_key": None}}), env={}).api_key is None
    assert load_settings(env={"LOOM_API_KEY": "k1,,k2,"}).api_key == ["k1", "k2"]  # a stray comma names no key


def test_bad_value_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(config=write(tmp_path, {"server": {"port": "eighty"}}), env={})
    with pytest.raises(ConfigError, match="LOOM_MAX_MODELS"):
        load_settings(env={"LOOM_MAX_MODELS": "many"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config=str(tmp_path / "nope.yaml"), env={})


class Knobs:
    """A plugin with settings of its own, registered in-process."""

    @hookimpl
    def options(self) -> list[Option]:
        return [
            Option("knobs", "level", 1, "a level", "knob-level", minimum=1),
            Option("knobs", "target", None, "where to"),
            Option("knobs", "ratio", 0.5, "a ratio"),
        ]


def test_a_plugins_options_come_from_file_env_and_flag(tmp_path: Path) -> None:
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Knobs(), name="knobs")
    options = plugin_options(pm)
    level, target, ratio = options
    config = write(tmp_path, {"knobs": {"level": 3, "target": "there"}, "server": {"port": 9001}})

    defaults = load_settings(env={}, options=options)
    assert (level.of(defaults), target.of(defaults), ratio.of(defaults)) == (1, None, 0.5)
    from_file = load_settings(config=config, env={}, options=options)
    assert (level.of(from_file), target.of(from_file), from_file.port) == (3, "there", 9001)
    env = {"LOOM_KNOBS_LEVEL": "4", "LOOM_KNOBS_RATIO": "0.25"}
    from_env = load_settings(config=config, env=env, options=options)
    assert (level.of(from_env), target.of(from_env), ratio.of(from_env)) == (4, "there", 0.25)
    args = build_parser(options).parse_args(["serve", "--config", config, "--knob-level", "5"])
    from_flag = build_settings(args, env=env, options=options)
    assert (level.of(from_flag), ratio.of(from_flag)) == (5, 0.25)
    # A replica or a worker rebuilds the same settings from their fields.
    assert Settings(**attrs.asdict(from_flag)) == from_flag

    with pytest.raises(ConfigError) as bad:
        load_settings(env={"LOOM_KNOBS_LEVEL": "many"}, options=options)
    assert bad.value.field == "knobs_level" and "int" in bad.value.detail
    with pytest.raises(ConfigError) as low:
        load_settings(env={"LOOM_KNOBS_LEVEL": "0"}, options=options)
    assert low.value.field == "knobs_level" and "at least 1" in low.value.detail
    with pytest.raises(ConfigError) as unknown:
        load_settings(config=write(tmp_path, {"knobs": {"levle": 2}}), env={}, options=options)
    assert unknown.value.field == "knobs.levle" and unknown.value.allowed == ["level", "ratio", "target"]
    assert "(known: level, ratio, target)" in unknown.value.detail  # what `loom serve` prints
    with pytest.raises(ConfigError) as missing:  # without the plugin, its section is unknown
        load_settings(config=config, env={})
    assert missing.value.field == "knobs" and "plugin installed" in missing.value.detail


def test_two_plugins_may_not_declare_one_setting() -> None:
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Knobs(), name="knobs")
    pm.register(Knobs(), name="knobs-again")
    with pytest.raises(ConfigError, match="knobs_level"):
        plugin_options(pm)


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("LOOM_DEFAULT_DEVICE", "bogus", "default_device"),
        ("LOOM_DEFAULT_DEVICE", "cuda:one", "default_device"),
        ("LOOM_AUTO_UNLOAD_MINUTES", "nan", "auto_unload_minutes"),
        ("LOOM_AUTO_UNLOAD_MINUTES", "-1", "auto_unload_minutes"),
        ("LOOM_AUTO_UNLOAD_MINUTES", "inf", "auto_unload_minutes"),
        ("LOOM_REQUEST_TIMEOUT", "nan", "request_timeout"),
        ("LOOM_REQUEST_TIMEOUT", "inf", "request_timeout"),
        ("LOOM_MAX_BODY_MB", "inf", "max_body_mb"),
        ("LOOM_MAX_BODY_MB", "nan", "max_body_mb"),
        ("LOOM_MAX_RESPONSE_MB", "nan", "max_response_mb"),
        ("LOOM_MEMORY_FRACTION", "0", "memory_fraction"),
        ("LOOM_MEMORY_FRACTION", "1.5", "memory_fraction"),
        ("LOOM_MEMORY_FRACTION", "nan", "memory_fraction"),
    ],
)
def test_a_variable_no_setting_can_use_is_an_error_naming_it(var: str, value: str, field: str) -> None:
    """Each was accepted: an unknown device failed every load, NaN minutes never unloaded, an infinite body limit
    crashed the app's start with a traceback, a fraction of 0 refused every model."""
    with pytest.raises(ConfigError) as exc:
        load_settings(env={var: value})
    assert exc.value.field == field and field in exc.value.detail


@pytest.mark.parametrize(
    ("section", "key", "value", "field", "says"),
    [
        ("models", "trust_remote_code", "ture", "trust_remote_code", "true or false"),
        ("models", "allow_remote_code_requests", "maybe", "allow_remote_code_requests", "true or false"),
        ("models", "trust_remote_code", 2, "trust_remote_code", "true or false"),
        ("models", "default_dtype", "fp16", "default_dtype", "bfloat16"),
        ("models", "max_tokens_limit", -1, "max_tokens_limit", "negative"),
        ("models", "auto_unload_minutes", float("nan"), "auto_unload_minutes", "finite"),
        ("hidden_states", "precision", "fp32", "default_precision", "float16"),
        ("hidden_states", "default_format", "json", "default_format", "safetensors"),
        ("gpu", "default_device", "gpu0", "default_device", "cuda:N"),
    ],
)
def test_a_file_value_no_setting_can_use_is_an_error_naming_it(
    tmp_path: Path, section: str, key: str, value: object, field: str, says: str
) -> None:
    """A boolean that is not one ("ture") read as false, quietly turning a setting off; the others were accepted
    and failed every request that relied on them."""
    with pytest.raises(ConfigError) as exc:
        load_settings(config=write(tmp_path, {section: {key: value}}), env={})
    assert exc.value.field == field and field in exc.value.detail and says in exc.value.detail


def test_booleans_take_their_usual_spellings(tmp_path: Path) -> None:
    for value, expected in [(True, True), ("yes", True), ("On", True), (1, True), ("off", False), (0, False)]:
        config = write(tmp_path, {"models": {"trust_remote_code": value}})
        assert load_settings(config=config, env={}).trust_remote_code is expected, value


def test_a_plugins_boolean_or_number_must_be_one() -> None:
    """A plugin's boolean read "ture" as false, and its float settings took NaN (which passes any minimum)."""
    flag, ratio = Option("knobs", "flag", False, "a flag"), Option("knobs", "ratio", 0.5, "a ratio", minimum=0)
    assert flag.of(load_settings(env={"LOOM_KNOBS_FLAG": "yes"}, options=[flag])) is True
    with pytest.raises(ConfigError, match=r"LOOM_KNOBS_FLAG: .*true or false") as bad:
        load_settings(env={"LOOM_KNOBS_FLAG": "ture"}, options=[flag])
    assert bad.value.field == "knobs_flag"
    for value in ("nan", "inf"):
        with pytest.raises(ConfigError, match="finite") as bad:
            load_settings(env={"LOOM_KNOBS_RATIO": value}, options=[ratio])
        assert bad.value.field == "knobs_ratio"


def test_a_config_path_that_is_a_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory") as exc:
        load_settings(config=str(tmp_path), env={})
    assert exc.value.field == "config"
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(env={"LOOM_CONFIG": str(tmp_path)})

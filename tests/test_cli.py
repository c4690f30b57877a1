"""The `loom` command: plugins, probe, serve's errors; run as `python -m loom_kernel` like a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest

from loom_kernel import ProbeResult, hookimpl
from loom_kernel.cli import main, normalize_argv
from loom_kernel.plugins import create_plugin_manager

REPO = Path(__file__).resolve().parents[1]


def loom(*args: str, home: Path, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", **extra)
    return subprocess.run(
        [sys.executable, "-m", "loom_kernel", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("loom: error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_plugins_json_lists_the_transports_from_their_entry_points(tmp_path: Path) -> None:
    result = loom("plugins", "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["plugins"]}
    assert rows["http"]["package"] == "loom-plugin-http" and rows["http"]["hooks"] == ["transport"]
    assert rows["unix"]["package"] == "loom-plugin-unix" and rows["unix"]["hooks"] == ["transport"]
    assert rows["loom_kernel.default_plugins.pooling"]["default"] is True


def test_plugins_table(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOM_LOAD_PLUGINS", raising=False)
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PACKAGE", "VERSION", "HOOKS"]
    assert any(line.split()[:2] == ["http", "loom-plugin-http"] for line in lines)
    assert any(line.split()[:2] == ["unix", "loom-plugin-unix"] for line in lines)


def test_probe_unknown_model_exits_2_with_a_message(tmp_path: Path) -> None:
    assert_one_line_error(loom("probe", "no-such-org/no-such-model", home=tmp_path), "no-such-org/no-such-model")
    assert_one_line_error(loom("probe", str(tmp_path / "missing"), home=tmp_path), "no directory")


class Confident:
    @hookimpl
    def probe(self, model: object) -> ProbeResult:
        return ProbeResult(loader="zeta", score=0.9, reason="config.json names LlamaForCausalLM")


class Tied:
    @hookimpl
    def probe(self, model: object) -> ProbeResult:
        return ProbeResult(loader="alpha", score=0.9, reason="also fine")


class Hopeless:
    @hookimpl
    def probe(self, model: object) -> ProbeResult:
        return ProbeResult(loader="omega", score=0.0, reason="not my format")


def fake_pm(*plugins: object) -> pluggy.PluginManager:
    pm = create_plugin_manager(load_entry_points=False)
    for plugin in plugins:
        pm.register(plugin)
    return pm


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return tmp_path


def test_probe_ranks_by_score_then_name(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(model_dir))
    monkeypatch.setattr("loom_kernel.cli.create_plugin_manager", lambda **_: fake_pm(Hopeless(), Confident(), Tied()))
    assert main(["probe", str(model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["selected"] == "alpha"
    assert [(r["loader"], r["score"], r["selected"]) for r in report["ranking"]] == [
        ("alpha", 0.9, True),
        ("zeta", 0.9, False),
        ("omega", 0.0, False),
    ]
    assert report["path"] == str(model_dir) and report["source"] == "local"

    assert main(["probe", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[:3] == ["*", "alpha", "0.90"]
    assert lines[4].split()[:2] == ["zeta", "0.90"]
    assert "config.json names LlamaForCausalLM" in lines[4]


def test_probe_without_a_capable_loader_exits_1(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(model_dir))
    monkeypatch.setattr("loom_kernel.cli.create_plugin_manager", lambda **_: fake_pm(Hopeless()))
    assert main(["probe", str(model_dir)]) == 1
    assert "no installed loader can load this model" in capsys.readouterr().out


def test_serve_unknown_transport_exits_2(tmp_path: Path) -> None:
    result = loom("serve", "--transport", "http,carrier-pigeon", home=tmp_path)
    assert_one_line_error(result, "unknown transport 'carrier-pigeon'", "known transports: http, ray, unix")


def test_serve_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = loom("serve", "--port", str(port), home=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"loom: error: http: cannot listen on http://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("server:\n  prot: 1\n")
    assert_one_line_error(loom("serve", "--config", str(tmp_path / "bad.yaml"), home=tmp_path), "server.prot")


@pytest.mark.parametrize(
    "content", [b"server:\n  port: [8080\n", b"\xff\xfeserver: {}\n"], ids=["not-yaml", "not-utf8"]
)
def test_a_config_file_that_cannot_be_read_exits_2_naming_it(tmp_path: Path, content: bytes) -> None:
    """A YAML syntax error, or bytes that are not text, is the operator's to fix: one line naming the file."""
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    assert_one_line_error(loom("serve", "--config", str(path), home=tmp_path), str(path))
    assert_one_line_error(loom("probe", "gpt2", "--config", str(path), home=tmp_path), str(path))


def test_serve_refuses_fewer_than_one_model(tmp_path: Path) -> None:
    """max_models below 1 stops the server before it listens, naming the setting: the manager would keep one model
    anyway, and Ray's multiplexing refuses 0 (a traceback after Ray started) and takes -1 for no limit at all."""
    assert_one_line_error(loom("serve", "--port", "0", "--max-models", "0", home=tmp_path), "max_models", "at least 1")
    result = loom("serve", "--port", "0", home=tmp_path, LOOM_MAX_MODELS="-1")
    assert_one_line_error(result, "max_models", "at least 1")


def test_serve_refuses_an_empty_api_key(tmp_path: Path) -> None:
    """An operator who names a key means to require one: an empty one stops the server before it listens, naming
    where it was set, rather than serving every request without a key."""
    result = loom("serve", "--port", "0", home=tmp_path, LOOM_API_KEY="")
    assert_one_line_error(result, "LOOM_API_KEY", "empty")
    (tmp_path / "keyless.yaml").write_text('server:\n  api_key: ""\n')
    result = loom("serve", "--port", "0", "--config", str(tmp_path / "keyless.yaml"), home=tmp_path)
    assert_one_line_error(result, "server.api_key", "empty")


def test_serve_refuses_settings_it_cannot_use(tmp_path: Path) -> None:
    """Each started the server: an unknown device (every load then a 422), NaN or negative idle minutes (the timer
    never fired), a boolean typo in the file (read as false), and a config path that is a directory (said "does not
    exist")."""
    serve = ("serve", "--port", "0")
    assert_one_line_error(loom(*serve, "--device", "bogus", home=tmp_path, timeout=30), "default_device", "bogus")
    result = loom(*serve, home=tmp_path, timeout=30, LOOM_DEFAULT_DEVICE="bogus")
    assert_one_line_error(result, "default_device", "bogus")
    result = loom(*serve, "--device", "cuda:999", home=tmp_path, timeout=30)  # no machine has this one
    assert_one_line_error(result, "default_device", "cuda:999")
    for minutes in ("nan", "-1", "inf"):
        result = loom(*serve, "--auto-unload-minutes", minutes, home=tmp_path, timeout=30)
        assert_one_line_error(result, "auto_unload_minutes")
    (tmp_path / "typo.yaml").write_text('models:\n  trust_remote_code: "ture"\n')
    result = loom(*serve, "--config", str(tmp_path / "typo.yaml"), home=tmp_path, timeout=30)
    assert_one_line_error(result, "models.trust_remote_code", "'ture'", "true or false")
    result = loom(*serve, "--config", str(tmp_path), home=tmp_path, timeout=30)
    assert_one_line_error(result, str(tmp_path), "is a directory")


def test_serve_is_the_default_command() -> None:
    assert normalize_argv([]) == ["serve"]
    assert normalize_argv(["--port", "8080"]) == ["serve", "--port", "8080"]
    assert normalize_argv(["--version"]) == ["--version"]
    assert normalize_argv(["plugins"]) == ["plugins"]

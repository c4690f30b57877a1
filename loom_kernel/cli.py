"""``loom serve | plugins | probe``: the command line.

``loom`` alone, or ``loom --port 8080`` (the seed's spelling), means ``loom serve``. Errors the user can fix
(bad configuration, unknown model or transport, a port in use) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pluggy import PluginManager

from loom_kernel.config import Option, Settings, load_settings
from loom_kernel.errors import LoomError
from loom_kernel.logs import LEVELS
from loom_kernel.plugins import create_plugin_manager, plugin_options
from loom_kernel.version import __version__


def build_parser(options: Sequence[Option] = ()) -> argparse.ArgumentParser:
    """``options``: the installed plugins' settings; those with a flag are ``loom serve`` flags too."""
    parser = argparse.ArgumentParser(
        prog="loom", description="The Loom: a research server that returns the hidden states of transformer models."
    )
    parser.add_argument("--version", action="version", version=f"loom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server (the default command)")
    serve.add_argument(
        "--config", metavar="PATH", help="config file (default: LOOM_CONFIG, ~/.config/loom/config.yaml)"
    )
    serve.add_argument("--host", help="TCP address to bind (default 127.0.0.1; a host with ':' is IPv6)")
    serve.add_argument("--port", type=int, help="TCP port (default 8080; 0 picks a free one)")
    serve.add_argument(
        "--transport",
        dest="transports",
        metavar="NAME[,NAME]",
        help="http, unix, both, or any installed transport's name; comma separated (default http)",
    )
    serve.add_argument(
        "--unix-socket",
        metavar="PATH",
        help="socket path for the unix transport (default $XDG_RUNTIME_DIR/loom.sock, else a private directory)",
    )
    serve.add_argument(
        "--preload",
        metavar="MODEL",
        action="append",
        default=[],
        help="load MODEL at start, after those of the config file and LOOM_PRELOAD (repeatable)",
    )
    serve.add_argument("--max-models", type=int, help="models kept in memory before LRU eviction (default 3)")
    serve.add_argument("--auto-unload-minutes", type=float, help="unload a model idle this long (default 20; 0 = off)")
    serve.add_argument("--device", dest="default_device", help="default device: cpu, cuda, cuda:N, auto")
    serve.add_argument("--log-level", choices=LEVELS, help="default info")
    for option in options:
        if option.flag:
            serve.add_argument(f"--{option.flag}", dest=option.name, metavar=option.key.upper(), help=option.help)
    add_plugins_dir(serve)

    plugins = sub.add_parser("plugins", help="list the installed plugins and the hooks they implement")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_plugins_dir(plugins)

    probe = sub.add_parser("probe", help="rank the loaders that could load MODEL, without loading it")
    probe.add_argument("model", metavar="MODEL", help="local directory, alias, or hub id in the local HF cache")
    probe.add_argument("--revision", help="hub revision")
    probe.add_argument("--config", metavar="PATH", help="config file (for models.aliases and models.allowed_paths)")
    probe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def add_plugins_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugins-dir",
        metavar="DIR",
        help="also register every *.py file in DIR as a plugin named after the file (default: LOOM_PLUGINS_DIR)",
    )


def build_settings(
    args: argparse.Namespace, env: dict[str, str] | None = None, options: Sequence[Option] = ()
) -> Settings:
    """Defaults < config file < environment < these flags; ``--preload`` adds to the models named before it."""
    names = [
        "host",
        "port",
        "transports",
        "unix_socket",
        "max_models",
        "auto_unload_minutes",
        "default_device",
        "log_level",
    ]
    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in names + [o.name for o in options]}
    settings = load_settings(config=args.config, env=env, options=options, **overrides)
    extra = getattr(args, "preload", None) or []
    settings.preload = list(dict.fromkeys([*settings.preload, *extra]))
    return settings


def cmd_serve(args: argparse.Namespace, pm: PluginManager) -> int:
    from loom_kernel.serve import serve

    return serve(build_settings(args, options=plugin_options(pm)), pm)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for line in (headers, ["-" * w for w in widths], *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def cmd_plugins(args: argparse.Namespace, pm: PluginManager) -> int:
    from loom_kernel.installed import describe_plugins

    rows = describe_plugins(pm)
    if args.json:
        print(json.dumps({"plugins": rows}, indent=2))  # the body GET /plugins returns
        return 0
    print_table(
        ["NAME", "PACKAGE", "VERSION", "HOOKS"],
        [
            [
                r["name"] + (" (default)" if r["default"] else ""),
                r["package"] or "-",
                r["version"] or "-",
                ", ".join(r["hooks"]),
            ]
            for r in rows
        ],
    )
    return 0


def cmd_probe(args: argparse.Namespace, pm: PluginManager) -> int:
    """What GET /loaders/probe/{model} answers, computed without a server."""
    from loom_kernel.models import ModelManager

    settings = load_settings(config=args.config, options=plugin_options(pm))
    report = ModelManager(pm, settings).probe_report(args.model, args.revision)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model: {report['model']} ({report['source']}: {report['path']})")
        print_table(
            ["", "LOADER", "SCORE", "REASON"],
            [["*" if r["selected"] else "", r["loader"], f"{r['score']:.2f}", r["reason"]] for r in report["ranking"]],
        )
        if report["selected"] is None:
            print("no installed loader can load this model")
    # Scripts can test `loom probe MODEL` for loadability; a model that cannot be found already exited 2.
    return 0 if report["selected"] is not None else 1


def normalize_argv(argv: list[str]) -> list[str]:
    """``loom`` and ``loom --port 8080`` are ``loom serve ...``, as in the seed's documentation."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["serve", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    handlers = {"serve": cmd_serve, "plugins": cmd_plugins, "probe": cmd_probe}
    try:
        # The plugins first: their settings are flags of ``loom serve``.
        early = argparse.ArgumentParser(add_help=False)
        early.add_argument("--plugins-dir")
        pm = create_plugin_manager(plugins_dir=early.parse_known_args(argv)[0].plugins_dir)
        args = build_parser(plugin_options(pm)).parse_args(argv)
        return handlers[args.command](args, pm)
    except LoomError as exc:  # ConfigError included: the user's to fix, so a message, not a traceback
        print(f"loom: error: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

"""The ``unix`` transport: a Unix domain socket at ``settings.unix_socket``, private to its owner (mode 0600)."""

from __future__ import annotations

from typing import Any

from loom_kernel import Transport, hookimpl
from loom_unix.listener import UnixListener, default_unix_socket


@hookimpl
def transport(settings: Any) -> Transport:
    # Building the listener touches nothing on disk: that waits for bind(), when the transport is selected. The
    # default path's directory is this user's own, made at bind; a path the user names must be in a directory that
    # exists.
    listener = UnixListener(settings.unix_socket or default_unix_socket(), make_directory=not settings.unix_socket)
    return Transport(
        name="unix",
        describe=f"HTTP over the Unix domain socket {listener.path} (mode 0600, removed at exit)",
        bind=listener.bind,
        cleanup=listener.close,
    )

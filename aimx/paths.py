"""Where aimx keeps its files: config dir, data dir, runtime dir.

Every process (daemon, CLI, MCP) resolves paths the same way, so the
environment overrides below are the one switch for running several
instances on a host or a development instance without root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_CONFIG_DIR = Path("/etc/aimx")
DEFAULT_DATA_DIR = Path("/var/lib/aimx")
DEFAULT_RUNTIME_DIR = Path("/run/aimx")


def config_dir() -> Path:
    """The config dir: ``AIMX_CONFIG_DIR`` or ``/etc/aimx``."""
    value = os.environ.get("AIMX_CONFIG_DIR")
    return Path(value) if value else DEFAULT_CONFIG_DIR


def config_path() -> Path:
    return config_dir() / "config.toml"


def dkim_dir() -> Path:
    return config_dir() / "dkim"


UNNAMED_PRIVATE_KEY = "private.key"
UNNAMED_PUBLIC_KEY = "public.key"
_SELECTOR_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def dkim_selector_problem(selector: str) -> str | None:
    """Why ``selector`` cannot name a DKIM key, or ``None``.

    A selector becomes part of a DNS name and of a file name in the key dir,
    so it is held to DNS labels (letters, digits, underscores, inner hyphens)
    joined by dots: nothing that could climb out of the directory or hide a file.
    Underscores are more than RFC 6376 asks, but DNS carries them and selectors
    such as ``mail_2024`` were accepted before keys were named by selector.
    """
    if not selector or len(selector) > 253:
        return "a selector is 1 to 253 characters"
    if not all(_SELECTOR_LABEL.fullmatch(label) for label in selector.split(".")):
        return ("use DNS labels of letters, digits, underscores and inner hyphens "
                "(1-63 each), separated by dots")
    return None


def dkim_key_paths(selector: str, signing_selector: str,
                   directory: os.PathLike[str] | str | None = None) -> tuple[Path, Path]:
    """(private, public) key files of ``selector``.

    Every key is ``<selector>.private.key`` / ``<selector>.public.key``, except
    the signing selector's on an install that has never rotated: that one is
    ``private.key`` / ``public.key`` as it always was, until a rotation names it.
    """
    base = Path(directory) if directory is not None else dkim_dir()
    if dkim_selector_problem(selector) is not None:
        raise ValueError(f"invalid DKIM selector {selector!r}")
    named = base / f"{selector}.private.key", base / f"{selector}.public.key"
    if selector == signing_selector and not named[0].exists():
        return base / UNNAMED_PRIVATE_KEY, base / UNNAMED_PUBLIC_KEY
    return named


def runtime_dir() -> Path:
    """The runtime dir (socket, pid file): ``AIMX_RUNTIME_DIR`` or ``/run/aimx``."""
    value = os.environ.get("AIMX_RUNTIME_DIR")
    return Path(value) if value else DEFAULT_RUNTIME_DIR


def socket_path() -> Path:
    return runtime_dir() / "aimx.sock"


def pid_path() -> Path:
    return runtime_dir() / "aimx.pid"


def data_dir_override(flag: str | os.PathLike[str] | None = None) -> Path | None:
    """The data-dir override of this process: ``--data-dir`` beats ``AIMX_DATA_DIR``.

    ``None`` means "use the config's ``data_dir``". The override lives only in
    memory; it is never written back to ``config.toml``.
    """
    if flag:
        return Path(flag)
    value = os.environ.get("AIMX_DATA_DIR")
    return Path(value) if value else None

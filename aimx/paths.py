"""Where aimx keeps its files: config dir, data dir, runtime dir.

Every process (daemon, CLI, MCP) resolves paths the same way, so the
environment overrides below are the one switch for running several
instances on a host or a development instance without root.
"""

from __future__ import annotations

import os
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

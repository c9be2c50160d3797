"""``aimx mcp``: the stdio MCP server an agent spawns (spec 50 §2.5, §3)."""

from __future__ import annotations

import argparse
from typing import Any

from aimx.cli.main import describe


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "mcp", parents=parents,
        description=describe("mcp"),
        help="run the stdio MCP server for AI agents",
    )


def run(args: argparse.Namespace) -> int:
    # Imported here so other commands do not pay for the MCP SDK's imports.
    from aimx.mcp.server import run_stdio

    return run_stdio()

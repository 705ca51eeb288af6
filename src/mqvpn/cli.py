"""Command line entry point (grows into the mqvpn-compatible CLI)."""

from __future__ import annotations

import argparse
import sys

from mqvpn import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mqvpn", description="Multipath QUIC VPN")
    parser.add_argument("--version", action="version", version=f"mqvpn {__version__}")
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 2

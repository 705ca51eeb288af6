"""The ``mqvpn`` command: flags and config as in the reference C mqvpn (see ``mqvpn.config``), logging, dispatch.

Exit codes: 0 after ``--version``, ``--genkey`` or ``--help``; 2 for any configuration error (one line on stderr,
``mqvpn: error: ...``) and for features not available yet; otherwise whatever the daemon returns (130 after Ctrl-C).
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from mqvpn import __version__
from mqvpn.config import ConfigError, Settings, build_settings, parse_command_line

_log = logging.getLogger("mqvpn.cli")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# syslog priorities, understood by journald as a "<N>" line prefix on a service's stderr
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """``LEVEL message``, after a local timestamp unless journald adds its own (then a ``<N>`` priority prefix)."""

    def __init__(self, *, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journald:
            priority = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
            return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))
        stamp = datetime.datetime.fromtimestamp(record.created).isoformat(sep=" ", timespec="milliseconds")
        return f"{stamp} {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def under_journald(stream: TextIO) -> bool:
    """True when ``stream`` goes to the systemd journal: JOURNAL_STREAM is set, the stream is not a TTY, and (when
    both can be told) the stream's device:inode is the one JOURNAL_STREAM names."""
    journal = os.environ.get("JOURNAL_STREAM")
    if not journal:
        return False
    try:
        if stream.isatty():
            return False
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True
    try:
        dev, ino = (int(part) for part in journal.split(":"))
        st = os.fstat(fd)
    except (OSError, ValueError):
        return True
    return (st.st_dev, st.st_ino) == (dev, ino)


_OUR_HANDLER = "_mqvpn_cli_handler"


def configure_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send the ``mqvpn`` loggers to ``stream`` (stderr) at ``level`` in ``fmt``; replaces an earlier call's
    handler, so calling it again (tests, reloads) never duplicates lines."""
    stream = sys.stderr if stream is None else stream
    logger = logging.getLogger("mqvpn")
    for handler in list(logger.handlers):
        if getattr(handler, _OUR_HANDLER, False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    setattr(handler, _OUR_HANDLER, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journald=under_journald(stream)))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level])
    return handler


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def _error(message: str) -> int:
    print(f"mqvpn: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _generate_key() -> str:
    from mqvpn.masque.auth import generate_key

    return generate_key()


def _load_daemon(mode: str):
    """``run_server`` / ``run_client`` from ``mqvpn.server`` / ``mqvpn.client`` (imported only when needed)."""
    module_name, func_name = ("mqvpn.server", "run_server") if mode == "server" else ("mqvpn.client", "run_client")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name:
            raise ConfigError(f"{mode} mode is not available in this build yet ({module_name} is missing)") from None
        raise ConfigError(f"{mode} mode cannot start: {exc}") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise ConfigError(f"{mode} mode is not available in this build yet ({module_name}.{func_name} is missing)")
    return func


def run(settings: Settings) -> int:
    """Log the settings' warnings, then run the client or server daemon until it ends."""
    for warning in settings.warnings:
        _log.warning("%s", warning)
    if settings.insecure and settings.mode == "client":
        _log.warning("TLS certificate verification is OFF (--insecure): anyone on the path can impersonate the server")
    elif settings.insecure:
        _log.warning("--insecure only applies to a client; ignored")
    daemon = _load_daemon(settings.mode)
    _log.debug("starting %s (mqvpn %s)", settings.mode, __version__)
    result = daemon(settings)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    return EXIT_OK if result is None else int(result)


def main(argv: Sequence[str] | None = None) -> int:
    """The console entry point: ``mqvpn [flags]``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cmd = parse_command_line(argv)
    except ConfigError as exc:
        return _error(str(exc))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK

    if cmd.version:
        print(f"mqvpn {__version__}")
        return EXIT_OK
    if cmd.genkey:
        print(_generate_key())
        return EXIT_OK
    if cmd.status:
        return _error("--status is not implemented yet")

    try:
        settings = build_settings(cmd)
        configure_logging(settings.log_level, settings.log_format)
        return run(settings)
    except ConfigError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

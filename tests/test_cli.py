"""mqvpn.cli: exit codes, --version, --genkey, error lines, logging set-up and dispatch to the daemons.

The daemons are always replaced by fakes here: main() must never start a real client or server from a unit test.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
import types

import pytest

import mqvpn
from mqvpn import cli
from mqvpn.config import Settings

KEY = "m5Gd2Hq8dTQk0sX1zJ9cV3bN7yR4wL6pA2eF8hK0uI4="
CLIENT = ["--mode", "client", "--server", "vpn.example.com:443"]


class FakeDaemons:
    """Stand-ins for mqvpn.client / mqvpn.server: record the settings, optionally log, return ``result``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Settings]] = []
        self.result: object = 0
        self.action = None

    def _run(self, mode: str, settings: Settings):
        self.calls.append((mode, settings))
        if self.action is not None:
            return self.action(settings)
        return self.result

    def modules(self) -> dict[str, types.ModuleType]:
        client = types.ModuleType("mqvpn.client")
        client.run_client = lambda settings: self._run("client", settings)
        server = types.ModuleType("mqvpn.server")
        server.run_server = lambda settings: self._run("server", settings)
        return {"mqvpn.client": client, "mqvpn.server": server}


@pytest.fixture(autouse=True)
def daemons(monkeypatch) -> FakeDaemons:
    fake = FakeDaemons()
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield fake
    logger = logging.getLogger("mqvpn")
    for handler in list(logger.handlers):
        if getattr(handler, "_mqvpn_cli_handler", False):
            logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def pki(tmp_path) -> list[str]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    return ["--cert", str(cert), "--key", str(key)]


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mqvpn: error: ")
    return lines[0][len("mqvpn: error: ") :]


# ---------------------------------------------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------------------------------------------


def test_version(capsys, daemons):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"mqvpn {mqvpn.__version__}\n"
    assert daemons.calls == []


def test_genkey(capsys, daemons):
    keys = set()
    for _ in range(20):
        assert cli.main(["--genkey"]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n") and out.count("\n") == 1
        key = out.strip()
        assert len(key) == 44 and re.fullmatch(r"[A-Za-z0-9+/]{43}=", key)
        assert len(base64.b64decode(key, validate=True)) == 32
        keys.add(key)
    assert len(keys) == 20
    assert daemons.calls == []


def test_genkey_needs_no_other_settings(capsys):
    assert cli.main(["--genkey", "--config", "/nonexistent/mqvpn.conf"]) == 0  # the config is not read
    assert len(capsys.readouterr().out.strip()) == 44


def test_status_not_implemented(capsys, daemons):
    assert cli.main(["--status"]) == 2
    assert _error_line(capsys) == "--status is not implemented yet"
    assert daemons.calls == []


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mqvpn") and "--auth-key KEY" in out and "--no-manage-routes" in out


def test_main_reads_sys_argv(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mqvpn", "--version"])
    assert cli.main() == 0
    assert capsys.readouterr().out.startswith("mqvpn ")


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(mqvpn.__file__)))
    done = subprocess.run(
        [sys.executable, "-m", "mqvpn", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, f"mqvpn {mqvpn.__version__}\n")
    done = subprocess.run(
        [sys.executable, "-m", "mqvpn", "--mtu", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 2
    assert (
        done.stderr == "mqvpn: error: argument --mtu: invalid value '1': must be 0 (automatic) or from 1280 to 9000\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, exit code 2
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[Interface]\nFoo = 1\n", "{path}:2: unknown key 'Foo' in [Interface]"),
        ("[Bogus]\n", "{path}:1: unknown section [Bogus]"),
        (
            "[Server]\nAddress = h:1\n[Interface]\nKillSwitch = maybe\n",
            "{path}:4: invalid KillSwitch 'maybe' in [Interface]: must be true/yes/on/1 or false/no/off/0",
        ),
        (
            "[Server]\nAddress = ::1\n",
            "{path}:2: invalid Address '::1' in [Server]: an IPv6 address needs brackets: [::1]:PORT",
        ),
        (
            "[Interface]\nTunName = x\n",
            (
                "cannot tell whether to run as client or server: give --mode client|server "
                "(or set [Interface] Listen for a server, [Server] Address for a client)"
            ),
        ),
        ('{"mtu": 5}', "{path}: invalid \"mtu\" value '5': must be 0 (automatic) or from 1280 to 9000"),
        ('{"bogus": 5}', '{path}: unknown key "bogus"'),
    ],
)
def test_config_errors_exit_2(tmp_path, capsys, daemons, text, expected):
    path = tmp_path / "mqvpn.conf"
    path.write_text(text)
    assert cli.main(["--config", str(path)]) == 2
    assert _error_line(capsys) == expected.format(path=path)
    assert daemons.calls == []


def test_missing_config_exit_2(tmp_path, capsys):
    path = tmp_path / "missing.conf"
    assert cli.main(["--config", str(path)]) == 2
    assert _error_line(capsys) == f"{path}: cannot read config: No such file or directory"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--mode", "server", "--auth-key"], "argument --auth-key: expected one argument"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--mode", "peer"], "argument --mode: invalid value 'peer': must be one of client, server"),
        (["--mode", "server"], "a server needs --auth-key or --user (refusing to run without authentication)"),
        (["--mode", "client"], "a client needs a server address: --server HOST:PORT (or [Server] Address)"),
        (
            [*CLIENT, "--path", "eth/0"],
            (
                "argument --path: invalid value 'eth/0': an interface name is 1-15 ASCII "
                "characters, without '/', ':' or whitespace"
            ),
        ),
        (
            [*CLIENT, "--auth-key", "bad\x01key"],
            "argument --auth-key: invalid value (hidden): the key contains a control character",
        ),
    ],
)
def test_flag_errors_exit_2(capsys, daemons, argv, expected):
    assert cli.main(argv) == 2
    assert _error_line(capsys) == expected
    assert daemons.calls == []


def test_server_without_auth_refuses(capsys, daemons, pki):
    assert cli.main(["--mode", "server", *pki]) == 2
    assert "refusing to run without authentication" in _error_line(capsys)
    assert daemons.calls == []


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_dispatch_client(daemons):
    daemons.result = 7
    assert cli.main([*CLIENT, "--path", "eth0"]) == 7
    [(mode, settings)] = daemons.calls
    assert mode == "client" and settings.paths == ["eth0"] and settings.server.host == "vpn.example.com"


def test_dispatch_server(daemons, pki):
    assert cli.main(["--listen", "[::]:4433", "--auth-key", KEY, *pki]) == 0
    [(mode, settings)] = daemons.calls
    assert mode == "server" and settings.listen.port == 4433 and settings.auth_key == KEY


def test_dispatch_none_is_0_and_coroutines_are_run(daemons):
    daemons.result = None
    assert cli.main(CLIENT) == 0

    async def run(settings):
        return 3

    daemons.action = run
    assert cli.main(CLIENT) == 3


def test_ctrl_c_is_130(daemons):
    def interrupted(settings):
        raise KeyboardInterrupt

    daemons.action = interrupted
    assert cli.main(CLIENT) == 130


@pytest.mark.parametrize("mode, argv", [("client", CLIENT), ("server", ["--mode", "server", "--auth-key", KEY])])
def test_daemon_module_missing(monkeypatch, capsys, pki, mode, argv):
    monkeypatch.setitem(sys.modules, f"mqvpn.{mode}", None)  # makes the import fail with ModuleNotFoundError
    assert cli.main([*argv, *pki]) == 2
    assert _error_line(capsys) == f"{mode} mode is not available in this build yet (mqvpn.{mode} is missing)"


def test_daemon_function_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mqvpn.client", types.ModuleType("mqvpn.client"))
    assert cli.main(CLIENT) == 2
    assert _error_line(capsys) == "client mode is not available in this build yet (mqvpn.client.run_client is missing)"


def test_daemon_dependency_missing(monkeypatch, capsys):
    def failing_import(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'pyroute2'", name="pyroute2")

    monkeypatch.setattr(cli.importlib, "import_module", failing_import)
    assert cli.main(CLIENT) == 2
    assert _error_line(capsys) == "client mode cannot start: No module named 'pyroute2'"


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------


def _log_everything(settings):
    log = logging.getLogger("mqvpn.test")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    log.error("an error line")
    return 0


@pytest.mark.parametrize(
    "level, shown",
    [
        ("debug", ["DEBUG", "INFO", "WARNING", "ERROR"]),
        ("info", ["INFO", "WARNING", "ERROR"]),
        ("warning", ["WARNING", "ERROR"]),
        ("warn", ["WARNING", "ERROR"]),
        ("error", ["ERROR"]),
    ],
)
def test_log_levels_honoured(capsys, daemons, level, shown):
    daemons.action = _log_everything
    assert cli.main([*CLIENT, "--log-level", level]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "line" in line]
    assert [line.split()[2] for line in lines] == shown  # "DATE TIME LEVEL message"


def test_log_level_from_config(tmp_path, capsys, daemons):
    path = tmp_path / "c.conf"
    path.write_text("[Server]\nAddress = h:1\n[Interface]\nLogLevel = error\n")
    daemons.action = _log_everything
    assert cli.main(["--config", str(path)]) == 0
    assert next(line for line in capsys.readouterr().err.splitlines() if "line" in line).endswith("ERROR an error line")


def test_text_format_has_timestamps_outside_journald(capsys, daemons):
    daemons.action = _log_everything
    assert cli.main(CLIENT) == 0
    line = capsys.readouterr().err.splitlines()[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO an info line", line)


def test_text_format_under_journald(monkeypatch, capsys, daemons):
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")  # capsys's stderr has no file descriptor: trusted as is
    daemons.action = _log_everything
    assert cli.main(CLIENT) == 0
    assert capsys.readouterr().err.splitlines() == [
        "<6>INFO an info line",
        "<4>WARNING a warning line",
        "<3>ERROR an error line",
    ]


def test_json_format(capsys, daemons):
    daemons.action = _log_everything
    assert cli.main([*CLIENT, "--log-format", "json", "--log-level", "debug"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    mine = [e for e in entries if e["logger"] == "mqvpn.test"]
    assert [(e["level"], e["message"]) for e in mine] == [
        ("debug", "a debug line"),
        ("info", "an info line"),
        ("warning", "a warning line"),
        ("error", "an error line"),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", e["time"]) for e in entries)


def test_insecure_logs_a_warning(capsys, daemons):
    assert cli.main([*CLIENT, "--insecure"]) == 0
    err = capsys.readouterr().err
    assert "WARNING TLS certificate verification is OFF (--insecure)" in err
    assert daemons.calls[0][1].insecure is True


def test_insecure_on_a_server(capsys, pki):
    assert cli.main(["--mode", "server", "--auth-key", KEY, "--insecure", *pki]) == 0
    err = capsys.readouterr().err
    assert "WARNING --insecure only applies to a client; ignored" in err and "OFF" not in err


def test_no_insecure_warning_by_default(capsys):
    assert cli.main(CLIENT) == 0
    assert "verification" not in capsys.readouterr().err


def test_settings_warnings_are_logged(capsys):
    assert cli.main([*CLIENT, "--control-port", "9090"]) == 0
    assert "WARNING --control-port: the TCP control API is not supported; use the control socket" in (
        capsys.readouterr().err
    )


def test_configure_logging_twice_does_not_duplicate():
    stream = io.StringIO()
    cli.configure_logging("info", "text", stream)
    cli.configure_logging("info", "text", stream)
    logging.getLogger("mqvpn.x").info("once")
    assert stream.getvalue().count("once") == 1


def test_exceptions_in_text_logs():
    stream = io.StringIO()
    cli.configure_logging("info", "text", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("mqvpn.x").exception("failed")
    text = stream.getvalue()
    assert "ERROR failed" in text and "ValueError: boom" in text


def test_under_journald_checks_the_stream(tmp_path, monkeypatch):
    with open(tmp_path / "log", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert cli.under_journald(f)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not cli.under_journald(f)  # inherited from a parent whose stderr went to the journal
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not cli.under_journald(f)


def test_under_journald_not_for_a_tty(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not cli.under_journald(Tty())
    assert cli.under_journald(io.StringIO())

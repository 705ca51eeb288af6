"""mqvpn.config: the option table, the command line, INI and JSON files, precedence, validation and errors."""

from __future__ import annotations

import dataclasses
import json
import re
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqvpn.config import (
    ACTION,
    LIST,
    OPTIONS,
    SWITCH,
    ConfigError,
    Endpoint,
    Settings,
    build_parser,
    load_settings,
    parse_endpoint,
    read_config_text,
    render_option_docs,
)

BY_NAME = {opt.name: opt for opt in OPTIONS}
CLIENT = ["--mode", "client", "--server", "vpn.example.com:443"]
KEY = "m5Gd2Hq8dTQk0sX1zJ9cV3bN7yR4wL6pA2eF8hK0uI4="


@pytest.fixture
def write(tmp_path):
    """write(text, name='mqvpn.conf') -> path of a file holding text."""

    def _write(text: str, name: str = "mqvpn.conf") -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return _write


@pytest.fixture
def pki(tmp_path) -> tuple[str, str]:
    """Readable (dummy) certificate and key files: the config only checks that they can be opened."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    return str(cert), str(key)


# ---------------------------------------------------------------------------------------------------------------
# The table itself
# ---------------------------------------------------------------------------------------------------------------

# For every option: a valid raw value (a list for list options), what it parses to, and an invalid raw value.
# A SWITCH has no raw value on the command line (the flag stores flag_value); its INI/JSON samples are booleans.
SAMPLES: dict[str, tuple[object, object, str]] = {
    "mode": ("client", "client", "peer"),
    "server": ("vpn.example.com:8443", Endpoint("vpn.example.com", 8443), "vpn.example.com:99999"),
    "tls_server_name": ("VPN.example.com", "vpn.example.com", "bad name"),
    "insecure": ("yes", True, "maybe"),
    "listen": ("[::]:8443", Endpoint("::", 8443), "0.0.0.0:x"),
    "subnet": ("10.8.0.0/16", IPv4Network("10.8.0.0/16"), "10.8.0.1/16"),
    "subnet6": ("fd00:6d71::/112", IPv6Network("fd00:6d71::/112"), "fd00::/127"),
    "tun_name": ("vpn7", "vpn7", "a-very-long-interface-name"),
    "mtu": ("1400", 1400, "1279"),
    "dns": (["1.1.1.1", "2606:4700:4700::1111"], ["1.1.1.1", "2606:4700:4700::1111"], "dns.example"),
    "reconnect": ("off", False, "sometimes"),
    "reconnect_interval": ("30", 30, "0"),
    "kill_switch": ("on", True, "2"),
    "manage_routes": ("no", False, "nope"),
    "nat": ("no", False, "nope"),
    "log_level": ("DEBUG", "debug", "loud"),
    "log_format": ("json", "json", "xml"),
    "qlog_dir": ("/var/log/mqvpn/qlog", "/var/log/mqvpn/qlog", "a\0b"),
    "workers": ("4", 4, "0"),
    "cert": ("/etc/mqvpn/server.crt", "/etc/mqvpn/server.crt", "a\0b"),
    "key": ("/etc/mqvpn/server.key", "/etc/mqvpn/server.key", "a\0b"),
    "ca": ("CA_FILE", "CA_FILE", "a\0b"),  # CA_FILE: replaced by a readable file
    "auth_key": (KEY, KEY, "a\x01b"),
    "users": (["alice:k1", "bob : k2"], {"alice": "k1", "bob": "k2"}, "alice"),
    "max_clients": ("100", 100, "65536"),
    "paths": (["eth0", "wlan0"], ["eth0", "wlan0"], "eth/0"),
    "scheduler": ("MinRTT", "minrtt", "random"),
    "cc": ("newreno", "newreno", "vegas"),
    "init_max_path_id": ("16", 16, "-1"),
    "metrics": ("127.0.0.1:9100", Endpoint("127.0.0.1", 9100), "127.0.0.1"),
    "control_listen": ("127.0.0.1:9090", Endpoint("127.0.0.1", 9090), "127.0.0.1"),
    "control_addr": ("::1", "::1", "not a host"),
    "control_port": ("9090", 9090, "70000"),
}
SETTING_OPTIONS = [opt for opt in OPTIONS if opt.kind != ACTION and opt.name != "config_path"]


def _sample(name: str, tmp_path: Path) -> tuple[object, object, str]:
    raw, expected, bad = SAMPLES[name]
    if raw == "CA_FILE":
        ca = tmp_path / "ca.pem"
        ca.write_text("ca")
        return str(ca), str(ca), bad
    return raw, expected, bad


def test_every_option_has_a_sample():
    assert {opt.name for opt in SETTING_OPTIONS} == set(SAMPLES)


def test_table_is_consistent():
    flags = [flag for opt in OPTIONS for flag in opt.flags]
    assert len(flags) == len(set(flags))
    ini = [(opt.section.lower(), opt.ini_key.lower()) for opt in OPTIONS if opt.ini_key]
    assert len(ini) == len(set(ini))
    json_keys = [k.lower() for opt in OPTIONS for k in (opt.json_key, *opt.json_aliases) if k]
    assert len(json_keys) == len(set(json_keys))
    for opt in OPTIONS:
        assert opt.help and opt.kind in ("value", "switch", "list", "action")
        assert (opt.section is None) == (opt.ini_key is None)
        if opt.kind != ACTION:
            assert opt.parse is not None
            assert opt.flags or opt.ini_key or opt.json_key


def test_settings_fields_and_defaults_match_the_table():
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert set(fields) == {opt.name for opt in OPTIONS if opt.kind != ACTION} | {"warnings", "origins"}
    blank = Settings()
    for opt in OPTIONS:
        if opt.kind != ACTION and opt.name != "mode":
            assert getattr(blank, opt.name) == opt.default, opt.name


def test_reference_names():
    """The reference's INI keys and JSON names (reference §1) are all there."""
    ini = {(opt.section, opt.ini_key) for opt in OPTIONS if opt.ini_key}
    for section, keys in {
        "Interface": "TunName Listen Subnet Subnet6 LogLevel KillSwitch ManageRoutes Reconnect ReconnectInterval "
        "MTU DNS",
        "Server": "Address ServerName Insecure",
        "TLS": "Cert Key",
        "Auth": "Key User MaxClients",
        "Control": "Listen",
        "Multipath": "Path Scheduler CC InitMaxPathId",
    }.items():
        for key in keys.split():
            assert (section, key) in ini
    json_keys = {k for opt in OPTIONS for k in (opt.json_key, *opt.json_aliases) if k}
    assert {
        "server_addr",
        "tls_server_name",
        "cert_file",
        "key_file",
        "auth_key",
        "server_auth_key",
        "users",
        "paths",
        "dns",
        "control_listen",
        "init_max_path_id",
        "mode",
        "max_clients",
    } <= json_keys
    flags = {flag for opt in OPTIONS for flag in opt.flags}
    assert {
        "--config",
        "--mode",
        "--server",
        "--listen",
        "--subnet",
        "--subnet6",
        "--tun-name",
        "--cert",
        "--key",
        "--tls-server-name",
        "--insecure",
        "--auth-key",
        "--user",
        "--genkey",
        "--path",
        "--dns",
        "--no-reconnect",
        "--kill-switch",
        "--no-manage-routes",
        "--control-port",
        "--control-addr",
        "--status",
        "--cc",
        "--scheduler",
        "--init-max-path-id",
        "--mtu",
        "--max-clients",
        "--log-level",
        "--version",
        "--ca",
        "--log-format",
        "--metrics",
        "--qlog-dir",
        "--workers",
    } <= flags


# ---------------------------------------------------------------------------------------------------------------
# Every option, in every form (table-driven)
# ---------------------------------------------------------------------------------------------------------------


def _base_args(name: str) -> list[str]:
    return [] if name in ("mode", "server") else list(CLIENT)


def _with_server(name: str) -> list[str]:
    return ["--server", "vpn.example.com"] if name == "mode" else ["--mode", "client"] if name == "server" else []


@pytest.mark.parametrize("opt", [o for o in SETTING_OPTIONS if o.flags], ids=lambda o: o.name)
def test_flag(opt, tmp_path):
    raw, expected, _ = _sample(opt.name, tmp_path)
    argv = _base_args(opt.name) + _with_server(opt.name)
    if opt.kind == SWITCH:
        argv.append(opt.flags[0])
        expected = opt.flag_value
    elif opt.kind == LIST:
        for item in raw:
            argv += [opt.flags[0], item]
    else:
        argv += [opt.flags[0], raw]
    s = load_settings(argv)
    assert getattr(s, opt.name) == expected
    assert s.origins[opt.name] == opt.flags[0]


@pytest.mark.parametrize("opt", [o for o in SETTING_OPTIONS if o.ini_key], ids=lambda o: o.name)
def test_ini_key(opt, write, tmp_path):
    raw, expected, _ = _sample(opt.name, tmp_path)
    lines = [f"[{opt.section}]"]
    if opt.kind == LIST and opt.item_sep:
        lines.append(f"{opt.ini_key} = {opt.item_sep.join(raw)}")
    elif opt.kind == LIST:
        lines += [f"{opt.ini_key} = {item}" for item in raw]
    else:
        lines.append(f"{opt.ini_key} = {raw}")
    path = write("\n".join(lines) + "\n")
    s = load_settings(["--config", path, *_base_args(opt.name), *_with_server(opt.name)])
    assert getattr(s, opt.name) == expected
    assert s.origins[opt.name].startswith(f"{path}:")


@pytest.mark.parametrize("opt", [o for o in SETTING_OPTIONS if o.json_key], ids=lambda o: o.name)
def test_json_key(opt, write, tmp_path):
    raw, expected, _ = _sample(opt.name, tmp_path)
    value: object = raw
    if opt.kind == SWITCH:
        value = expected
    elif opt.name in ("mtu", "max_clients", "workers", "reconnect_interval", "init_max_path_id", "control_port"):
        value = int(raw)  # numbers as JSON numbers
    path = write(json.dumps({opt.json_key: value}), "mqvpn.json")
    s = load_settings(["--config", path, *_base_args(opt.name), *_with_server(opt.name)])
    assert getattr(s, opt.name) == expected


@pytest.mark.parametrize("opt", [o for o in SETTING_OPTIONS if o.flags and o.kind != SWITCH], ids=lambda o: o.name)
def test_flag_bad_value(opt, tmp_path):
    _, _, bad = _sample(opt.name, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings([*_base_args(opt.name), opt.flags[0], bad])
    message = str(info.value)
    assert message.startswith(f"argument {opt.flags[0]}: invalid value ")
    assert "\n" not in message
    if opt.secret:
        assert bad not in message and "(hidden)" in message


@pytest.mark.parametrize("opt", [o for o in SETTING_OPTIONS if o.ini_key], ids=lambda o: o.name)
def test_ini_bad_value_names_file_line_and_key(opt, write, tmp_path):
    _, _, bad = _sample(opt.name, tmp_path)
    path = write(f"# settings\n\n[{opt.section}]\n{opt.ini_key} = {bad}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", path, *CLIENT])
    message = str(info.value)
    assert message.startswith(f"{path}:4: invalid {opt.ini_key} ")
    assert f" in [{opt.section}]: " in message
    assert "\n" not in message
    if opt.secret:
        assert bad.strip() not in message and "(hidden)" in message


@pytest.mark.parametrize("opt", [o for o in SETTING_OPTIONS if o.json_key], ids=lambda o: o.name)
def test_json_bad_value_names_file_and_key(opt, write, tmp_path):
    _, _, bad = _sample(opt.name, tmp_path)
    path = write(json.dumps({opt.json_key: [bad] if opt.kind == LIST else bad}), "mqvpn.json")
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", path, *_base_args(opt.name), *_with_server(opt.name)])
    assert str(info.value).startswith(f'{path}: invalid "{opt.json_key}"')


def test_defaults(pki):
    s = load_settings(CLIENT)
    assert s.mode == "client" and not s.is_server
    assert s.server == Endpoint("vpn.example.com", 443)
    assert s.listen == Endpoint("0.0.0.0", 443) and str(s.listen) == "0.0.0.0:443"
    assert s.subnet == IPv4Network("10.0.0.0/24") and s.subnet6 is None
    assert s.tun_name == "mqvpn0" and s.mtu == 0 and s.max_clients == 64
    assert (s.reconnect, s.reconnect_interval, s.kill_switch, s.manage_routes) == (True, 5, False, True)
    assert (s.scheduler, s.cc, s.log_level, s.log_format) == ("wlb", "bbr", "info", "text")
    assert s.insecure is False and s.ca is None and s.auth_key is None
    assert s.paths == [] and s.dns == [] and s.users == {}
    assert s.cert is None and s.key is None  # a client has none
    assert s.warnings == []


# ---------------------------------------------------------------------------------------------------------------
# Precedence and list semantics
# ---------------------------------------------------------------------------------------------------------------


def test_precedence_cli_over_ini_over_default(write):
    path = write("[Interface]\nMTU = 1400\nTunName = fromfile\n[Server]\nAddress = file.example.com:443\n")
    s = load_settings(["--config", path, "--mtu", "1500"])
    assert s.mtu == 1500  # CLI
    assert s.tun_name == "fromfile"  # INI
    assert s.max_clients == 64  # default
    assert s.server == Endpoint("file.example.com", 443)
    assert s.origins["mtu"] == "--mtu" and s.origins["tun_name"] == f"{path}:3 ([Interface] TunName)"
    assert "max_clients" not in s.origins


def test_cli_switch_overrides_ini(write):
    path = write("[Server]\nAddress = h:1\n[Interface]\nReconnect = yes\nManageRoutes = true\nKillSwitch = false\n")
    s = load_settings(["--config", path, "--no-reconnect", "--no-manage-routes", "--kill-switch"])
    assert (s.reconnect, s.manage_routes, s.kill_switch) == (False, False, True)


def test_repeatable_keys_accumulate_and_cli_lists_replace(write):
    path = write(
        "[Server]\nAddress = h:1\n"
        "[Multipath]\nPath = eth0\nPath = eth1\n"
        "[Interface]\nDNS = 1.1.1.1, 8.8.8.8\n"
        "[Auth]\nUser = alice:k1\nUser = bob:k2\n"
    )
    s = load_settings(["--config", path])
    assert s.paths == ["eth0", "eth1"]
    assert s.dns == ["1.1.1.1", "8.8.8.8"]
    assert s.users == {"alice": "k1", "bob": "k2"}
    s = load_settings(["--config", path, "--path", "wlan0", "--dns", "9.9.9.9", "--user", "carol:k3"])
    assert s.paths == ["wlan0"] and s.dns == ["9.9.9.9"] and s.users == {"carol": "k3"}


def test_cli_dns_accepts_comma_lists():
    s = load_settings([*CLIENT, "--dns", "1.1.1.1,1.0.0.1", "--dns", "::1"])
    assert s.dns == ["1.1.1.1", "1.0.0.1", "::1"]


def test_same_user_twice_last_key_wins(write):
    path = write("[Server]\nAddress = h:1\n[Auth]\nUser = alice:k1\nUser = alice:k2\n")
    assert load_settings(["--config", path]).users == {"alice": "k2"}


def test_scalar_given_twice_last_wins_with_warning(write):
    path = write("[Server]\nAddress = h:1\n[Interface]\nMTU = 1400\nmtu = 1500\n")
    s = load_settings(["--config", path])
    assert s.mtu == 1500
    assert s.warnings == [f"{path}:5: MTU in [Interface]: given again ({path}:4 ([Interface] MTU)); the last one wins"]


def test_dns_line_twice_replaces(write):
    path = write("[Server]\nAddress = h:1\n[Interface]\nDNS = 1.1.1.1\nDNS = 8.8.8.8, 8.8.4.4\n")
    s = load_settings(["--config", path])
    assert s.dns == ["8.8.8.8", "8.8.4.4"] and len(s.warnings) == 1


def test_too_many_paths_names_the_line(write):
    lines = "\n".join(f"Path = eth{i}" for i in range(9))
    path = write(f"[Server]\nAddress = h:1\n[Multipath]\n{lines}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:12: Path in [Multipath]: too many entries (at most 8)")):
        load_settings(["--config", path])
    eight = [arg for i in range(8) for arg in ("--path", f"eth{i}")]
    assert len(load_settings([*CLIENT, *eight]).paths) == 8
    with pytest.raises(ConfigError, match=r"^argument --path: too many entries \(at most 8\)$"):
        load_settings([*CLIENT, *eight, "--path", "eth8"])


def test_too_many_dns():
    with pytest.raises(ConfigError, match=r"^argument --dns: too many entries \(at most 4\)$"):
        load_settings([*CLIENT, "--dns", "1.1.1.1,1.1.1.2,1.1.1.3,1.1.1.4,1.1.1.5"])


def test_duplicate_path(write):
    path = write("[Server]\nAddress = h:1\n[Multipath]\nPath = eth0\nPath = eth0\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:5: Path in [Multipath]: eth0 is listed twice")):
        load_settings(["--config", path])


# ---------------------------------------------------------------------------------------------------------------
# INI syntax
# ---------------------------------------------------------------------------------------------------------------


def test_comments_whole_line_and_inline(write):
    path = write(
        "# whole-line comment\n"
        "  ; indented comment\n"
        "[Server]   # comment after a section\n"
        "Address = vpn.example.com:443   # inline\n"
        "[Interface] ; also\n"
        "TunName = tun#1  ; '#' without whitespace before it is part of the value\n"
        "MTU=1400;not a comment? no: no whitespace before ';' -> part of the value\n"
    )
    with pytest.raises(ConfigError, match=re.escape(f"{path}:7: invalid MTU")):
        load_settings(["--config", path])
    path = write(
        "[Server]\n"
        "Address = vpn.example.com:443\t# tab before the comment\n"
        "[Auth]\n"
        "Key = abc#def ; comment\n"
        "User = alice:k;1   # the ';' in the key stays\n"
        "[Interface]\n"
        "MTU = 1400 #comment\n"
    )
    s = load_settings(["--config", path])
    assert s.server == Endpoint("vpn.example.com", 443)
    assert s.auth_key == "abc#def"
    assert s.users == {"alice": "k;1"}
    assert s.mtu == 1400


def test_a_value_that_is_only_a_comment_is_missing(write):
    path = write("[Interface]\nTunName = # nothing\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: missing value for TunName in [Interface]")):
        load_settings(["--config", path, *CLIENT])


def test_case_insensitive_sections_keys_and_booleans(write):
    path = write(
        "[SERVER]\naddress = vpn.example.com:443\nINSECURE = YES\n"
        "[interface]\ntunname = vpn9\nkillswitch = On\nmanageroutes = FALSE\n"
        "[multipath]\npath = eth0\nSCHEDULER = MINRTT\n"
    )
    s = load_settings(["--config", path])
    assert s.insecure and s.kill_switch and not s.manage_routes
    assert s.tun_name == "vpn9" and s.paths == ["eth0"] and s.scheduler == "minrtt"


@pytest.mark.parametrize(
    "text, value",
    [(t, True) for t in ("true", "TRUE", "yes", "Yes", "on", "ON", "1")]
    + [(f, False) for f in ("false", "False", "no", "NO", "off", "Off", "0")],
)
def test_booleans(write, text, value):
    path = write(f"[Server]\nAddress = h:1\n[Interface]\nKillSwitch = {text}\n")
    assert load_settings(["--config", path]).kill_switch is value


def test_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "crlf.conf"
    path.write_bytes(b"\xef\xbb\xbf[Server]\r\n\r\nAddress = h.example:1\r\n[Interface]\r\nMTU = 1400\r\n")
    s = load_settings(["--config", str(path)])
    assert s.server == Endpoint("h.example", 1) and s.mtu == 1400


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("[Interface]\nFoo = 1\n", 2, "unknown key 'Foo' in [Interface]"),
        ("[interface]\n\n  FOO = 1\n", 3, "unknown key 'FOO' in [Interface]"),
        ("[Server]\nListen = 0.0.0.0:443\n", 2, "unknown key 'Listen' in [Server]"),
        ("[Bogus]\nX = 1\n", 1, "unknown section [Bogus]"),
        ("TunName = x\n", 1, "key 'TunName' is outside any [Section]"),
        ("[Interface]\njust words\n", 2, "expected 'Key = Value' or '[Section]'"),
        ("[Interface]\n= value\n", 2, "expected 'Key = Value' or '[Section]'"),
        ("[Interface\n", 1, "malformed section header (expected [Section])"),
        ("[Interface] junk\n", 1, "malformed section header (expected [Section])"),
        ("[Interface]\nMTU =\n", 2, "missing value for MTU in [Interface]"),
        (
            "[Interface]\nKillSwitch = maybe\n",
            2,
            "invalid KillSwitch 'maybe' in [Interface]: must be true/yes/on/1 or false/no/off/0",
        ),
        ("[Interface]\nMTU = 100\n", 2, "invalid MTU '100' in [Interface]: must be 0 (automatic) or from 1280 to 9000"),
        ("[Interface]\nMTU = 1400.5\n", 2, "invalid MTU '1400.5' in [Interface]"),
        (
            "[Interface]\nSubnet = 10.0.0.1/24\n",
            2,
            "invalid Subnet '10.0.0.1/24' in [Interface]: host bits are set (the network is 10.0.0.0/24)",
        ),
        ("[Interface]\nTunName = this-name-is-too-long\n", 2, "invalid TunName 'this-name-is-too-long' in [Interface]"),
        ("[Auth]\nMaxClients = 0\n", 2, "invalid MaxClients '0' in [Auth]: must be a whole number from 1 to 65535"),
        ("[Auth]\nUser = alice\n", 2, "invalid User (hidden) in [Auth]: expected NAME:KEY"),
        ("[Auth]\nUser = :key\n", 2, "invalid User (hidden) in [Auth]"),
        (
            "[Multipath]\nScheduler = fastest\n",
            2,
            "invalid Scheduler 'fastest' in [Multipath]: must be one of wlb, minrtt, backup",
        ),
        (
            "[Server]\nAddress = ::1\n",
            2,
            "invalid Address '::1' in [Server]: an IPv6 address needs brackets: [::1]:PORT",
        ),
    ],
)
def test_ini_errors(write, text, line, message):
    path = write(text)
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", path, *CLIENT])
    assert str(info.value).startswith(f"{path}:{line}: {message}")
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", str(path), *CLIENT])
    assert str(info.value) == f"{path}: cannot read config: No such file or directory"


def test_config_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read config: Is a directory")):
        load_settings(["--config", str(tmp_path), *CLIENT])


def test_config_not_utf8(tmp_path):
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"[Interface]\nTunName = caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: cannot read config: not valid UTF-8")):
        load_settings(["--config", str(path), *CLIENT])


def test_secrets_never_in_messages(write):
    secret = "Zm9vYmFyc2VjcmV0a2V5"
    path = write(f"[Auth]\nKey = {secret}\x01\nUser = {secret}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", path, *CLIENT])
    assert secret not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings([*CLIENT, "--user", secret])
    assert secret not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Reference compatibility
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_SERVER_INI = """\
# mqvpn server configuration (reference layout)
[Interface]
TunName = mqvpn0
Listen = 0.0.0.0:443
Subnet = 10.0.0.0/24
Subnet6 = fd00:6d71::/112
LogLevel = warn

[TLS]
Cert = {cert}
Key = {key}

[Auth]
Key = {auth}
User = alice:{alice}
MaxClients = 32

[Control]
Listen = 127.0.0.1:9090

[Multipath]
Scheduler = wlb_udp_pin
CC = bbr2
InitMaxPathId = 8

[Reorder]
Enabled = auto
MaxWaitMs = 30

[ReorderRule]
Proto = udp
Port = 443
"""


def test_reference_server_ini_loads(write, pki):
    cert, key = pki
    path = write(REFERENCE_SERVER_INI.format(cert=cert, key=key, auth=KEY, alice="alicekey"))
    s = load_settings(["--config", path])
    assert s.mode == "server" and s.is_server
    assert s.listen == Endpoint("0.0.0.0", 443)
    assert s.subnet6 == IPv6Network("fd00:6d71::/112")
    assert s.log_level == "warning"  # the reference's "warn"
    assert (s.cert, s.key, s.auth_key, s.users, s.max_clients) == (cert, key, KEY, {"alice": "alicekey"}, 32)
    assert s.control_listen == Endpoint("127.0.0.1", 9090)
    assert (s.scheduler, s.cc, s.init_max_path_id) == ("wlb", "bbr2", 8)
    text = "\n".join(s.warnings)
    assert (
        f"{path}:22: Scheduler in [Multipath]: 'wlb_udp_pin' is not supported by this implementation; using 'wlb'"
        in text
    )
    assert f"{path}:26: section [Reorder] is not supported by this implementation; ignored" in text
    assert f"{path}:30: section [ReorderRule] is not supported" in text
    assert f"{path}:19 ([Control] Listen): the TCP control API is not supported; use the control socket" in text


def test_reference_client_ini_loads(write):
    path = write(
        "[Server]\nAddress = 203.0.113.7:443\nServerName = vpn.example.com\nInsecure = false\n"
        "[Auth]\nKey = " + KEY + "\n"
        "[Interface]\nDNS = 1.1.1.1, 8.8.8.8\nKillSwitch = true\nReconnect = true\nReconnectInterval = 10\n"
        "[Multipath]\nPath = eth0\nPath = wlan0\nScheduler = minrtt\n"
    )
    s = load_settings(["--config", path])
    assert s.mode == "client" and s.server == Endpoint("203.0.113.7", 443)
    assert s.tls_server_name == "vpn.example.com" and not s.insecure
    assert s.auth_key == KEY and s.paths == ["eth0", "wlan0"] and s.dns == ["1.1.1.1", "8.8.8.8"]
    assert s.kill_switch and s.reconnect and s.reconnect_interval == 10 and s.scheduler == "minrtt"
    assert s.warnings == []


@pytest.mark.parametrize("given, used", [("wlb_udp_pin", "wlb"), ("backup_fec", "backup")])
def test_reference_schedulers_are_substituted(given, used):
    s = load_settings([*CLIENT, "--scheduler", given])
    assert s.scheduler == used
    assert s.warnings == [f"argument --scheduler: '{given}' is not supported by this implementation; using '{used}'"]


def test_cc_none_is_substituted():
    s = load_settings([*CLIENT, "--cc", "none"])
    assert s.cc == "cubic" and len(s.warnings) == 1


def test_control_flags_warn():
    s = load_settings([*CLIENT, "--control-port", "9090", "--control-addr", "127.0.0.1"])
    assert (s.control_port, s.control_addr) == (9090, "127.0.0.1")
    assert s.warnings == [
        "--control-addr: the TCP control API is not supported; use the control socket",
        "--control-port: the TCP control API is not supported; use the control socket",
    ]


# ---------------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------------


def test_reference_json_server(write, pki):
    cert, key = pki
    path = write(
        json.dumps(
            {
                "mode": "server",
                "listen": "[::]:8443",
                "subnet": "10.1.0.0/24",
                "tun_name": "mqvpn1",
                "cert_file": cert,
                "key_file": key,
                "users": ["alice:k1", {"name": "bob", "key": "k2"}],
                "max_clients": 10,
                "kill_switch": False,
                "mtu": 1400,
                "log_level": "debug",
                "reorder": {"enabled": "on"},
                "hybrid": {"enabled": True},
                "reorder_rules": [],
                "subnet6": None,
            },
            indent=2,
        ),
        "server.json",
    )
    s = load_settings(["--config", path])
    assert s.mode == "server" and s.listen == Endpoint("::", 8443) and str(s.listen) == "[::]:8443"
    assert s.users == {"alice": "k1", "bob": "k2"} and s.max_clients == 10 and s.mtu == 1400
    assert s.subnet == IPv4Network("10.1.0.0/24") and s.subnet6 is None and s.log_level == "debug"
    assert sorted(s.warnings) == sorted(
        f'{path}: "{k}" is not supported by this implementation; ignored'
        for k in ("reorder", "hybrid", "reorder_rules")
    )


def test_reference_json_client(write):
    path = write(
        '  \n{"server_addr": "vpn.example.com:443", "server_auth_key": "' + KEY + '", "paths": ["eth0", "eth1"],'
        ' "dns": ["1.1.1.1"], "insecure": true, "Reconnect": "no", "scheduler": "backup"}',
        "client.json",
    )
    s = load_settings(["--config", path])
    assert s.mode == "client" and s.server == Endpoint("vpn.example.com", 443)
    assert s.auth_key == KEY and s.paths == ["eth0", "eth1"] and s.dns == ["1.1.1.1"]
    assert s.insecure and not s.reconnect and s.scheduler == "backup"
    assert s.warnings == [f'{path}: "server_auth_key" is deprecated; use "auth_key"']


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"mtu": 1400,}', ":1: invalid JSON: Expecting property name enclosed in double quotes (column 14)"),
        ('{"mtu": 1400}\n{}', ":2: invalid JSON: Extra data (column 1)"),
        ('{"foo": 1}', ': unknown key "foo"'),
        ('{"mtu": "big"}', ": invalid \"mtu\" value 'big': must be 0 (automatic) or from 1280 to 9000"),
        ('{"mtu": 1400.0}', ": invalid \"mtu\" value '1400.0'"),
        ('{"mtu": true}', ': invalid "mtu": expected a string or a number, not a boolean'),
        ('{"tun_name": ["a"]}', ': invalid "tun_name": expected a string, number or boolean'),
        ('{"insecure": "maybe"}', ": invalid \"insecure\" value 'maybe': must be true/yes/on/1 or false/no/off/0"),
        ('{"paths": 5}', ': invalid "paths": expected a list'),
        ('{"paths": ["eth0", "eth0"]}', ': "paths": eth0 is listed twice'),
        ('{"dns": ["1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4", "1.1.1.5"]}', ': "dns": too many entries (at most 4)'),
        ('{"users": [{"name": "a"}]}', ': invalid "users": each user is "NAME:KEY" or {"name": NAME, "key": KEY}'),
        ('{"users": ["nokey"]}', ': invalid "users" value (hidden): expected NAME:KEY'),
        ('{"mode": "peer"}', ": invalid \"mode\" value 'peer': must be one of client, server"),
        ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", ": invalid JSON: nested too deeply"),
    ],
)
def test_json_errors(write, text, message):
    path = write(text, "bad.json")
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", path, *CLIENT])
    assert str(info.value).startswith(path + message)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Mode and the combination of settings
# ---------------------------------------------------------------------------------------------------------------


def test_mode_from_listen(write, pki):
    cert, key = pki
    path = write(f"[Interface]\nListen = 0.0.0.0:4433\n[TLS]\nCert = {cert}\nKey = {key}\n[Auth]\nKey = {KEY}\n")
    assert load_settings(["--config", path]).mode == "server"


def test_mode_from_server_address(write):
    path = write("[Server]\nAddress = vpn.example.com:443\n")
    assert load_settings(["--config", path]).mode == "client"


def test_listen_wins_over_address_like_the_reference(write, pki):
    cert, key = pki
    path = write(f"[Interface]\nListen = 0.0.0.0:443\n[Server]\nAddress = h:1\n[Auth]\nKey = {KEY}\n")
    assert load_settings(["--config", path, "--cert", cert, "--key", key]).mode == "server"
    assert load_settings(["--config", path, "--mode", "client"]).mode == "client"


def test_mode_from_flags(pki):
    cert, key = pki
    assert load_settings(["--server", "h:1"]).mode == "client"
    s = load_settings(["--listen", "127.0.0.1:4433", "--auth-key", KEY, "--cert", cert, "--key", key])
    assert s.mode == "server" and s.listen == Endpoint("127.0.0.1", 4433)


def test_mode_unknown(write):
    with pytest.raises(ConfigError, match=r"^cannot tell whether to run as client or server: give --mode"):
        load_settings([])
    path = write("[Interface]\nTunName = x\n")
    with pytest.raises(ConfigError, match=r"give --mode client\|server"):
        load_settings(["--config", path])


def test_server_refuses_without_auth(pki):
    cert, key = pki
    with pytest.raises(ConfigError) as info:
        load_settings(["--mode", "server", "--cert", cert, "--key", key])
    assert str(info.value) == "a server needs --auth-key or --user (refusing to run without authentication)"


@pytest.mark.parametrize("auth", [["--auth-key", KEY], ["--user", "alice:k1"], ["--user", "a:k1", "--user", "b:k2"]])
def test_server_with_auth(pki, auth):
    cert, key = pki
    s = load_settings(["--mode", "server", "--cert", cert, "--key", key, *auth])
    assert s.is_server and (s.auth_key or s.users)


def test_server_keys_must_be_distinct(pki):
    cert, key = pki
    with pytest.raises(ConfigError, match="^invalid authentication settings: key for 'b' is already used by user 'a'$"):
        load_settings(["--mode", "server", "--cert", cert, "--key", key, "--user", "a:same", "--user", "b:same"])


def test_server_cert_and_key_must_be_readable(write, tmp_path, pki, monkeypatch):
    cert, key = pki
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as info:
        load_settings(["--mode", "server", "--auth-key", KEY, "--cert", missing, "--key", key])
    assert str(info.value) == f"argument --cert: cannot read TLS certificate '{missing}': No such file or directory"
    path = write(f"[Interface]\nListen = 0.0.0.0:443\n[Auth]\nKey = {KEY}\n[TLS]\nCert = {cert}\nKey = {missing}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", path])
    assert str(info.value) == (
        f"{path}:7: Key in [TLS]: cannot read TLS private key '{missing}': No such file or directory"
    )
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")  # no server.crt here: the defaults are named
    with pytest.raises(ConfigError) as info:
        load_settings(["--mode", "server", "--auth-key", KEY])
    assert str(info.value) == (
        "cannot read TLS certificate 'server.crt' (the default; give --cert or [TLS] Cert): No such file or directory"
    )


def test_server_default_cert_and_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "server.crt").write_text("c")
    (tmp_path / "server.key").write_text("k")
    s = load_settings(["--mode", "server", "--auth-key", KEY])
    assert (s.cert, s.key) == ("server.crt", "server.key")


def test_client_needs_a_server():
    with pytest.raises(ConfigError) as info:
        load_settings(["--mode", "client"])
    assert str(info.value) == "a client needs a server address: --server HOST:PORT (or [Server] Address)"


def test_client_ca_must_be_readable(tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(ConfigError, match=re.escape(f"argument --ca: cannot read CA file '{missing}'")):
        load_settings([*CLIENT, "--ca", str(missing)])


def test_client_verification_is_strict_by_default(tmp_path):
    assert load_settings(CLIENT).insecure is False
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = load_settings([*CLIENT, "--ca", str(ca), "--insecure"])
    assert s.insecure and s.warnings == ["--ca is ignored: --insecure turns certificate verification off"]


# ---------------------------------------------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, host, port",
    [
        ("vpn.example.com:8443", "vpn.example.com", 8443),
        ("VPN.Example.COM.", "vpn.example.com.", 443),
        ("localhost", "localhost", 443),
        ("203.0.113.7:443", "203.0.113.7", 443),
        ("203.0.113.7", "203.0.113.7", 443),
        ("[::1]:443", "::1", 443),
        ("[::1]", "::1", 443),
        ("[2001:DB8::1]:8443", "2001:db8::1", 8443),
        ("[fe80::1%eth0]:443", "fe80::1%eth0", 443),
        ("1:2:3:4:5:6:7:8:443", "1:2:3:4:5:6:7:8", 443),  # only one reading is valid: the reference's
        ("my_host.lan:1", "my_host.lan", 1),
    ],
)
def test_endpoints(text, host, port):
    assert parse_endpoint(text) == Endpoint(host, port)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("::1", "an IPv6 address needs brackets: [::1]:PORT"),
        ("2001:db8::1", "an IPv6 address needs brackets: [2001:db8::1]:PORT"),
        ("2001:db8::1:443", "ambiguous IPv6 address: put it in brackets, [2001:db8::1]:443 or [2001:db8::1:443]:PORT"),
        ("[::1", "missing ']'"),
        ("[::1]443", "expected ':PORT' after ']'"),
        ("[1.2.3.4]:443", "[1.2.3.4] is not an IPv6 address"),
        ("[]:443", "[] is not an IPv6 address"),
        ("host:0", "the port must be a number from 1 to 65535"),
        ("host:65536", "the port must be a number from 1 to 65535"),
        ("host:+80", "the port must be a number"),
        ("host:", "the port must be a number"),
        (":443", "the host is empty"),
        ("", "the address is empty"),
        ("a b:1", "whitespace"),
        ("1.2.3.256:1", "not a valid IPv4 address"),
        ("-bad-.example:1", "not a valid host name"),
        ("bücher.example:1", "punycode"),
        ("a:b:c", "expected HOST:PORT or [IPV6]:PORT"),
    ],
)
def test_bad_endpoints(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_endpoint(text)


def test_endpoint_port_required():
    with pytest.raises(ConfigError, match="a port is required"):
        load_settings([*CLIENT, "--metrics", "[::1]"])
    assert load_settings([*CLIENT, "--metrics", "[::1]:9100"]).metrics == Endpoint("::1", 9100)


def test_server_ipv6_via_ini(write):
    path = write("[Server]\nAddress = [2001:db8::10]:4433\n")
    s = load_settings(["--config", path])
    assert s.server == Endpoint("2001:db8::10", 4433) and s.server.is_ipv6 and str(s.server) == "[2001:db8::10]:4433"


# ---------------------------------------------------------------------------------------------------------------
# Parser, docs
# ---------------------------------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for opt in OPTIONS:
        for flag in opt.flags:
            assert flag in out
    # a flag that turns a setting off says so (the option's text describes the setting)
    squashed = " ".join(out.split())
    for flag in ("--no-reconnect", "--no-nat", "--no-manage-routes"):
        assert re.search(re.escape(flag) + r" do not ", squashed), flag


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["extra"], "unrecognized arguments: extra"),
        (["--mtu"], "argument --mtu: expected one argument"),
        (["--insecure=yes"], "argument --insecure: ignored explicit argument 'yes'"),
    ],
)
def test_command_line_syntax_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(argv)


def test_render_option_docs():
    docs = render_option_docs()
    lines = docs.splitlines()
    assert lines[0] == "| Flag | INI key | JSON key | Default | Description |"
    for opt in OPTIONS:
        for flag in opt.flags:
            assert f"`{flag}" in docs
        if opt.ini_key:
            assert f"`[{opt.section}] {opt.ini_key}`" in docs
        if opt.json_key:
            assert f"`{opt.json_key}`" in docs
    assert "| `--subnet CIDR` | `[Interface] Subnet` | `subnet` | 10.0.0.0/24 |" in docs
    assert "| `--max-clients N` | `[Auth] MaxClients` | `max_clients` | 64 |" in docs
    assert "`[Multipath] Path` (repeatable)" in docs and "`[Interface] DNS` (comma list)" in docs
    assert lines[1] == "|---|---|---|---|---|"
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    assert all(len(re.split(r"(?<!\\)\|", line)) == 7 for line in lines)  # five cells, '|' in text escaped


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: any text gives settings or a one-line ConfigError, never another exception
# ---------------------------------------------------------------------------------------------------------------

_SECTIONS = sorted({opt.section for opt in OPTIONS if opt.section} | {"Reorder", "Bogus"})
_KEYS = sorted({opt.ini_key for opt in OPTIONS if opt.ini_key} | {"Foo"})
_VALUES = st.one_of(
    st.sampled_from(
        [
            "1",
            "0",
            "yes",
            "off",
            "1400",
            "65536",
            "10.0.0.0/24",
            "[::1]:443",
            "::1",
            "eth0",
            "a:b",
            "wlb",
            "#",
            ";",
            "a # b",
            "",
            "h:1",
            "x" * 300,
            "fd00::/64",
            "1.1.1.1, 8.8.8.8",
            "debug",
            "{",
        ]
    ),
    st.text(max_size=30),
)
_LINE = st.one_of(
    st.builds(lambda s: f"[{s}]", st.sampled_from(_SECTIONS)),
    st.builds(lambda k, v, c: f"{k} = {v}{c}", st.sampled_from(_KEYS), _VALUES, st.sampled_from(["", " # c", ";x"])),
    st.text(max_size=40),
)


def _check_fuzz(text: str, path: str) -> None:
    try:
        read_config_text(text, path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(path)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text(text):
    _check_fuzz(text, "fuzz.conf")


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE, max_size=25))
def test_fuzz_structured_ini(lines):
    _check_fuzz("\n".join(lines), "fuzz.conf")


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(sorted({o.json_key for o in OPTIONS if o.json_key} | {"reorder"})), st.text()),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=8,
        ),
        max_size=6,
    )
)
def test_fuzz_json(data):
    _check_fuzz(json.dumps(data), "fuzz.json")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(_LINE, max_size=20),
    extra=st.lists(
        st.sampled_from(["--mode", "--listen", "server", "client", "--server", "h:1", "--insecure"]), max_size=4
    ),
)
def test_fuzz_whole_load(tmp_path, lines, extra):
    path = tmp_path / "fuzz.conf"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        s = load_settings(["--config", str(path), *extra])
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert s.mode in ("client", "server")

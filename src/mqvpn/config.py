"""Settings for the mqvpn daemons: command-line flags, INI and JSON config files, all drop-in compatible with the
reference C mqvpn.

Every option is described ONCE, in ``OPTIONS``: its ``Settings`` field, command-line flag(s), INI section and key,
JSON key, value parser, default and help text. The argparse parser, the INI reader, the JSON reader and
``render_option_docs()`` are all generated from that table, so they cannot drift apart.

Sources, weakest first: built-in defaults < config file (``--config``) < command-line flags. A list given on the
command line (``--path``, ``--dns``, ``--user``) replaces the config file's list instead of extending it, like the
reference.

Config files:

- **JSON** when the first non-space character is ``{``: one flat object with the reference's snake_case names
  (``server_addr``, ``cert_file``, ``paths``, ``users``, ...). Keys are matched case-insensitively.
- **INI** otherwise. Section and key names are case-insensitive. ``#`` and ``;`` start a comment at the start of a
  line, or inside a line when preceded by whitespace (``MTU = 1400  # comment``), so a value such as ``a#b`` keeps
  its ``#``. ``User`` and ``Path`` may repeat; ``DNS`` is a comma list. A scalar key given twice: the last one wins
  (with a warning). Booleans: true/yes/on/1 and false/no/off/0, any case.
- Sections and keys the reference knows but this implementation does not ([Reorder], [ReorderRule], [Hybrid],
  [Advanced]; JSON ``reorder``, ``reorder_rules``, ``hybrid``) are accepted and ignored with a warning, so an
  existing reference config still loads. Anything else unknown is an error.
- Relative file names (certificates, keys, CA) are relative to the working directory, as in the reference.

Every problem is a ``ConfigError`` whose message is one line naming where the value came from: ``FILE:LINE`` and the
key for INI, the file and key for JSON (no line numbers there), the flag for the command line. Secrets (auth keys)
are never echoed in messages.

Deviations from the reference, on purpose: bad values, unknown keys and unreadable files are errors (the reference
warns and goes on); inline comments are stripped (the reference keeps them in the value); ``bbr2`` selects our BBR-style controller
(the default, ``bbr``); the reference schedulers ``wlb_udp_pin``/``backup_fec`` and CC ``none`` are replaced by ``wlb``/``backup``/``cubic`` with
a warning; the TCP control API (``--control-port``, ``--control-addr``, ``[Control] Listen``) is accepted but not
supported (a warning says to use the control socket).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, NamedTuple

from mqvpn.masque.auth import parse_user_spec

__all__ = [
    "OPTIONS",
    "CommandLine",
    "ConfigError",
    "ConfigLayer",
    "Endpoint",
    "Option",
    "Settings",
    "build_parser",
    "build_settings",
    "load_settings",
    "parse_command_line",
    "parse_endpoint",
    "read_config_text",
    "render_option_docs",
]

MAX_PATHS = 8
MAX_DNS = 4
DEFAULT_PORT = 443
DEFAULT_SERVER_CERT = "server.crt"
DEFAULT_SERVER_KEY = "server.key"
CONTROL_UNSUPPORTED = "the TCP control API is not supported; use the control socket"


class ConfigError(Exception):
    """A bad setting. ``str(error)`` is one line naming the file and line, the JSON key or the flag."""


class Endpoint(NamedTuple):
    """A host (name, IPv4 or IPv6 literal without brackets) and a port."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


DEFAULT_LISTEN = Endpoint("0.0.0.0", DEFAULT_PORT)
DEFAULT_SUBNET = IPv4Network("10.0.0.0/24")


# ---------------------------------------------------------------------------------------------------------------
# Value parsers: text -> value, ValueError(reason) on a bad value. The reason never repeats the value itself (the
# caller shows it, or hides it for secrets).
# ---------------------------------------------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]{1,20}")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("must be true/yes/on/1 or false/no/off/0")


def _int_parser(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        text = text.strip()
        if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(text)

    return parse


def parse_port(text: str) -> int:
    text = text.strip()
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return int(text)


def _parse_mtu(text: str) -> int:
    text = text.strip()
    if _DIGITS.fullmatch(text):
        value = int(text)
        if value == 0 or 1280 <= value <= 9000:
            return value
    raise ValueError("must be 0 (automatic) or from 1280 to 9000")


def _check_hostname(host: str) -> str:
    """A DNS name (ASCII, RFC 1123 labels; '_' tolerated) or an IPv4 literal; returns it normalised."""
    if not host:
        raise ValueError("the host is empty")
    if not host.isascii():
        raise ValueError("non-ASCII host name: use its xn-- (punycode) form")
    try:
        return str(IPv4Address(host))
    except ValueError:
        pass
    name = host.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not a valid host name or IP address")
    if labels[-1].isdigit():
        raise ValueError("not a valid IPv4 address")
    return host.lower()


def _check_ipv6(host: str) -> str:
    try:
        return str(IPv6Address(host))
    except ValueError:
        raise ValueError(f"[{host}] is not an IPv6 address") from None


def parse_endpoint(text: str, *, default_port: int | None = DEFAULT_PORT) -> Endpoint:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]``; without a port, ``default_port`` (``None``: the port is required).

    IPv6 without brackets is rejected with a message showing the bracketed form (``::1`` -> ``[::1]:PORT``), except
    when the only valid reading is the reference's (an IPv6 address, then ':' and the port, as in
    ``1:2:3:4:5:6:7:8:443``). When both readings are valid (``2001:db8::1:443``) it is ambiguous and rejected.
    """
    text = text.strip()
    if not text:
        raise ValueError("the address is empty")
    if _has_control(text) or any(c.isspace() for c in text):
        raise ValueError("the address contains whitespace or a control character")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("missing ']' after the IPv6 address")
        host, rest = _check_ipv6(text[1:close]), text[close + 1 :]
        if not rest:
            port = default_port
        elif rest.startswith(":"):
            port = parse_port(rest[1:])
        else:
            raise ValueError("expected ':PORT' after ']'")
    elif text.count(":") >= 2:
        head, _, tail = text.rpartition(":")
        whole_ok = _is_ipv6(text)
        split_ok = _is_ipv6(head) and _DIGITS.fullmatch(tail) is not None and 1 <= int(tail) <= 65535
        if whole_ok and split_ok:
            raise ValueError(f"ambiguous IPv6 address: put it in brackets, [{head}]:{tail} or [{text}]:PORT")
        if whole_ok:
            raise ValueError(f"an IPv6 address needs brackets: [{text}]:PORT")
        if not split_ok:
            raise ValueError("expected HOST:PORT or [IPV6]:PORT")
        host, port = str(IPv6Address(head)), int(tail)  # the reference's reading: the port after the last ':'
    else:
        host_text, colon, port_text = text.partition(":")
        host = _check_hostname(host_text)
        port = parse_port(port_text) if colon else default_port
    if port is None:
        raise ValueError("a port is required (HOST:PORT or [IPV6]:PORT)")
    return Endpoint(host, port)


def _is_ipv6(text: str) -> bool:
    try:
        IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_endpoint_port_required(text: str) -> Endpoint:
    return parse_endpoint(text, default_port=None)


def _parse_host(text: str) -> str:
    """A host name or an IP literal (IPv6 with or without brackets), no port."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return _check_ipv6(text[1:-1])
    if ":" in text:
        return _check_ipv6(text)
    return _check_hostname(text)


def _parse_subnet(text: str) -> IPv4Network:
    text = text.strip()
    if "/" not in text:
        raise ValueError("expected an IPv4 prefix such as 10.0.0.0/24")
    try:
        net = IPv4Network(text)
    except ValueError as exc:
        raise ValueError(_network_reason(text, exc, IPv4Network)) from None
    if net.prefixlen > 30:
        raise ValueError("the prefix must be /30 or shorter (a server address and at least one client)")
    return net


def _parse_subnet6(text: str) -> IPv6Network:
    text = text.strip()
    if "/" not in text:
        raise ValueError("expected an IPv6 prefix such as fd00:6d71::/112")
    try:
        net = IPv6Network(text)
    except ValueError as exc:
        raise ValueError(_network_reason(text, exc, IPv6Network)) from None
    if net.prefixlen > 126:
        raise ValueError("the prefix must be /126 or shorter (a server address and at least one client)")
    return net


def _network_reason(text: str, exc: ValueError, cls: type) -> str:
    if "host bits set" in str(exc):
        return f"host bits are set (the network is {cls(text, strict=False)})"
    return "not a valid network prefix"


def _parse_ifname(text: str) -> str:
    """A Linux interface name: 1-15 bytes, no '/', ':' or whitespace, not '.' or '..'."""
    name = text.strip()
    if (
        not name
        or len(name.encode("utf-8", "surrogatepass")) > 15
        or name in (".", "..")
        or not name.isascii()
        or not name.isprintable()
        or any(c in "/:" or c.isspace() for c in name)
    ):
        raise ValueError("an interface name is 1-15 ASCII characters, without '/', ':' or whitespace")
    return name


def _parse_file_name(text: str) -> str:
    name = text.strip()
    if not name:
        raise ValueError("the file name is empty")
    if "\0" in name:
        raise ValueError("the file name contains a NUL character")
    return name


def _parse_secret(text: str) -> str:
    key = text.strip()
    if not key:
        raise ValueError("the key is empty")
    if _has_control(key):
        raise ValueError("the key contains a control character")
    return key


def _parse_user(text: str) -> tuple[str, str]:
    name, colon, key = text.strip().partition(":")
    if not colon:
        raise ValueError("expected NAME:KEY")
    try:
        return parse_user_spec(f"{name.strip()}:{key.strip()}")
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _parse_dns_server(text: str) -> str:
    """An IPv4 or IPv6 address, returned in its normal text form."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError("a DNS server is an IPv4 or IPv6 address") from None


def _parse_server_name(text: str) -> str:
    text = text.strip()
    try:
        return _parse_host(text)
    except ValueError:
        raise ValueError("not a valid TLS server name (a host name or IP address)") from None


def _choice_parser(choices: Sequence[str], aliases: Mapping[str, str] | None = None) -> Callable[[str], str]:
    def parse(text: str) -> str:
        low = text.strip().lower()
        if low in choices:
            return low
        if aliases and low in aliases:
            return aliases[low]
        raise ValueError(f"must be one of {', '.join(choices)}")

    return parse


# ---------------------------------------------------------------------------------------------------------------
# The option table
# ---------------------------------------------------------------------------------------------------------------

VALUE, SWITCH, LIST, ACTION = "value", "switch", "list", "action"


@dataclass(frozen=True)
class Option:
    """One option, in every form it can take.

    ``kind``: ``value`` (one value, the last one wins), ``switch`` (a boolean; the flag stores ``flag_value``),
    ``list`` (items; a flag or a repeatable INI key adds one, a command-line list replaces the file's), or
    ``action`` (a command-line-only action such as ``--genkey``; no ``Settings`` field).
    """

    name: str  # Settings field (or action name)
    kind: str
    help: str
    flags: tuple[str, ...] = ()
    section: str | None = None  # INI section, canonical spelling
    ini_key: str | None = None  # INI key, canonical spelling
    json_key: str | None = None
    parse: Callable[[str], Any] | None = None
    default: Any = None
    default_doc: str | None = None  # how the default is shown in help and docs, when not str(default)
    metavar: str | None = None
    flag_value: bool = True  # SWITCH: what the flag stores
    ini_repeat: bool = False  # LIST: the INI key may repeat, each line adding items
    item_sep: str | None = None  # LIST: one INI line / JSON string holds items separated by this
    max_items: int | None = None
    unique: bool = False  # LIST: an item listed twice is an error
    secret: bool = False  # never echo the value in messages
    role: str = ""  # "client", "server" or "" (both), for docs
    json_aliases: tuple[str, ...] = ()  # deprecated JSON names, accepted with a warning
    substitutes: Mapping[str, str] = field(default_factory=dict)  # reference values we replace, with a warning
    unsupported: str | None = None  # accepted but not implemented: warning text when set

    @property
    def label(self) -> str:
        """How messages name this option: the flag, else the INI key."""
        if self.flags:
            return self.flags[0]
        return f"[{self.section}] {self.ini_key}" if self.ini_key else self.name

    def default_text(self) -> str:
        if self.default_doc is not None:
            return self.default_doc
        if self.default is None or self.default == [] or self.default == {}:
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return str(self.default)


_LOG_LEVELS = ("debug", "info", "warning", "error")

# One option per entry reads better than one argument per line.
# fmt: off
OPTIONS: tuple[Option, ...] = (
    # command-line-only actions and the config file itself
    Option("config_path", VALUE, "read settings from FILE (INI, or JSON when it starts with '{'); flags override it",
           flags=("--config",), parse=_parse_file_name, metavar="FILE"),
    Option("mode", VALUE, "run as client or server; without it, a Listen setting means server and a server address "
           "means client", flags=("--mode",), json_key="mode", parse=_choice_parser(("client", "server")),
           metavar="client|server", default_doc="auto"),
    Option("genkey", ACTION, "print a new random key (32 bytes as base64) and exit", flags=("--genkey",)),
    Option("status", ACTION, "show the status of a running mqvpn (not implemented yet)", flags=("--status",)),
    Option("version", ACTION, "print the version and exit", flags=("--version",)),
    # [Server]
    Option("server", VALUE, "server to connect to: HOST[:PORT] or [IPV6][:PORT] (port 443 if omitted)",
           flags=("--server",), section="Server", ini_key="Address", json_key="server_addr",
           parse=parse_endpoint, metavar="HOST:PORT", role="client"),
    Option("tls_server_name", VALUE, "name to verify in the server's certificate (default: the server host)",
           flags=("--tls-server-name",), section="Server", ini_key="ServerName", json_key="tls_server_name",
           parse=_parse_server_name, metavar="NAME", role="client"),
    Option("insecure", SWITCH, "do NOT verify the server's certificate (testing only; logs a warning)",
           flags=("--insecure",), section="Server", ini_key="Insecure", json_key="insecure",
           parse=parse_bool, default=False, role="client"),
    # [Interface]
    Option("listen", VALUE, "address and UDP port to listen on: ADDR[:PORT] or [IPV6][:PORT]",
           flags=("--listen",), section="Interface", ini_key="Listen", json_key="listen", parse=parse_endpoint,
           default=DEFAULT_LISTEN, metavar="ADDR:PORT", role="server"),
    Option("subnet", VALUE, "IPv4 prefix of the client address pool (.1 is the server)", flags=("--subnet",),
           section="Interface", ini_key="Subnet", json_key="subnet", parse=_parse_subnet,
           default=DEFAULT_SUBNET, metavar="CIDR", role="server"),
    Option("subnet6", VALUE, "IPv6 prefix of the client address pool (none: IPv4 only)", flags=("--subnet6",),
           section="Interface", ini_key="Subnet6", json_key="subnet6", parse=_parse_subnet6, metavar="CIDR",
           role="server"),
    Option("tun_name", VALUE, "name of the TUN interface", flags=("--tun-name",), section="Interface",
           ini_key="TunName", json_key="tun_name", parse=_parse_ifname, default="mqvpn0", metavar="NAME"),
    Option("mtu", VALUE, "MTU of the TUN interface: 0 = automatic, else 1280-9000", flags=("--mtu",),
           section="Interface", ini_key="MTU", json_key="mtu", parse=_parse_mtu, default=0, metavar="N"),
    Option("dns", LIST, f"DNS server to use while connected (repeatable, at most {MAX_DNS}; INI: a comma list)",
           flags=("--dns",), section="Interface", ini_key="DNS", json_key="dns", parse=_parse_dns_server,
           default=[], item_sep=",", max_items=MAX_DNS, metavar="ADDR", role="client"),
    Option("reconnect", SWITCH, "reconnect after the connection is lost", flags=("--no-reconnect",),
           flag_value=False, section="Interface", ini_key="Reconnect", json_key="reconnect", parse=parse_bool,
           default=True, role="client"),
    Option("reconnect_interval", VALUE, "first reconnect delay in seconds (it doubles up to 60 s)",
           section="Interface", ini_key="ReconnectInterval", json_key="reconnect_interval",
           parse=_int_parser(1, 86400), default=5, role="client"),
    Option("kill_switch", SWITCH, "block traffic outside the tunnel while it is up", flags=("--kill-switch",),
           section="Interface", ini_key="KillSwitch", json_key="kill_switch", parse=parse_bool, default=False,
           role="client"),
    Option("nat", SWITCH, "masquerade the client subnets (off: you route or NAT them yourself)",
           flags=("--no-nat",), flag_value=False, section="Interface", ini_key="NAT", json_key="nat",
           parse=parse_bool, default=True, role="server"),
    Option("manage_routes", SWITCH, "install the default routes through the tunnel (off: leave routing alone)",
           flags=("--no-manage-routes",), flag_value=False, section="Interface", ini_key="ManageRoutes",
           json_key="manage_routes", parse=parse_bool, default=True, role="client"),
    Option("log_level", VALUE, "least severe messages logged", flags=("--log-level",), section="Interface",
           ini_key="LogLevel", json_key="log_level", parse=_choice_parser(_LOG_LEVELS, {"warn": "warning"}),
           default="info", metavar="|".join(_LOG_LEVELS)),
    Option("log_format", VALUE, "log line format: text ('LEVEL message') or json (one object per line)",
           flags=("--log-format",), section="Interface", ini_key="LogFormat", json_key="log_format",
           parse=_choice_parser(("text", "json")), default="text", metavar="text|json"),
    Option("qlog_dir", VALUE, "write a qlog trace of every connection into DIR", flags=("--qlog-dir",),
           section="Interface", ini_key="QlogDir", json_key="qlog_dir", parse=_parse_file_name, metavar="DIR"),
    Option("workers", VALUE, "number of worker processes", flags=("--workers",), section="Interface",
           ini_key="Workers", json_key="workers", parse=_int_parser(1, 1024), default=1, metavar="N",
           role="server"),
    # [TLS]
    Option("cert", VALUE, "TLS certificate chain (PEM)", flags=("--cert",), section="TLS", ini_key="Cert",
           json_key="cert_file", parse=_parse_file_name, default_doc=DEFAULT_SERVER_CERT, metavar="FILE",
           role="server"),
    Option("key", VALUE, "TLS private key (PEM)", flags=("--key",), section="TLS", ini_key="Key",
           json_key="key_file", parse=_parse_file_name, default_doc=DEFAULT_SERVER_KEY, metavar="FILE",
           role="server"),
    Option("ca", VALUE, "verify the server against the CAs in FILE instead of the system CA store", flags=("--ca",),
           section="TLS", ini_key="CA", json_key="ca_file", parse=_parse_file_name, default_doc="system CA store",
           metavar="FILE", role="client"),
    # [Auth]
    Option("auth_key", VALUE, "pre-shared key (client: sent to the server; server: the global key)",
           flags=("--auth-key",), section="Auth", ini_key="Key", json_key="auth_key", parse=_parse_secret,
           metavar="KEY", secret=True, json_aliases=("server_auth_key",)),
    Option("users", LIST, "a user and their key (repeatable; the flags replace the config file's users)",
           flags=("--user",), section="Auth", ini_key="User", json_key="users", parse=_parse_user, default={},
           ini_repeat=True, metavar="NAME:KEY", secret=True, role="server"),
    Option("max_clients", VALUE, "most clients connected at once", flags=("--max-clients",), section="Auth",
           ini_key="MaxClients", json_key="max_clients", parse=_int_parser(1, 65535), default=64, metavar="N",
           role="server"),
    # [Multipath]
    Option("paths", LIST, f"network interface to send over (repeatable, at most {MAX_PATHS}; default: the routing "
           "table's choice)", flags=("--path",), section="Multipath", ini_key="Path", json_key="paths",
           parse=_parse_ifname, default=[], ini_repeat=True, max_items=MAX_PATHS, unique=True, metavar="IFACE",
           role="client"),
    Option("scheduler", VALUE, "multipath packet scheduler: wlb (weighted by path capacity), minrtt (fastest "
           "path first) or backup (extra paths only when the first fails)", flags=("--scheduler",),
           section="Multipath", ini_key="Scheduler", json_key="scheduler",
           parse=_choice_parser(("wlb", "minrtt", "backup")), default="wlb", metavar="wlb|minrtt|backup",
           substitutes={"wlb_udp_pin": "wlb", "backup_fec": "backup"}),
    Option("cc", VALUE, "congestion controller per path: bbr (model-based, paced; bbr2 is the same, the "
           "reference's name), cubic or newreno", flags=("--cc",), section="Multipath", ini_key="CC", json_key="cc",
           parse=_choice_parser(("bbr", "bbr2", "cubic", "newreno")), default="bbr",
           metavar="bbr|bbr2|cubic|newreno", substitutes={"none": "cubic"}),
    Option("init_max_path_id", VALUE, "initial maximum path ID offered to the peer (0 = the implementation's "
           "default)", flags=("--init-max-path-id",), section="Multipath", ini_key="InitMaxPathId",
           json_key="init_max_path_id", parse=_int_parser(0, 2**32 - 1), default=0, metavar="N"),
    # [Control] and observability
    Option("metrics", VALUE, "serve Prometheus metrics over HTTP on ADDR:PORT", flags=("--metrics",),
           section="Control", ini_key="Metrics", json_key="metrics", parse=_parse_endpoint_port_required,
           metavar="ADDR:PORT"),
    Option("control_listen", VALUE, "reference TCP control API address (not supported; use the control socket)",
           section="Control", ini_key="Listen", json_key="control_listen", parse=_parse_endpoint_port_required,
           unsupported=CONTROL_UNSUPPORTED),
    Option("control_addr", VALUE, "reference TCP control API address (not supported; use the control socket)",
           flags=("--control-addr",), parse=_parse_host, metavar="ADDR", unsupported=CONTROL_UNSUPPORTED),
    Option("control_port", VALUE, "reference TCP control API port (not supported; use the control socket)",
           flags=("--control-port",), parse=_int_parser(0, 65535), metavar="PORT", unsupported=CONTROL_UNSUPPORTED),
)
# fmt: on

_BY_NAME: dict[str, Option] = {opt.name: opt for opt in OPTIONS}
_INI_INDEX: dict[tuple[str, str], Option] = {
    (opt.section.lower(), opt.ini_key.lower()): opt for opt in OPTIONS if opt.section and opt.ini_key
}
_INI_SECTIONS: dict[str, str] = {opt.section.lower(): opt.section for opt in OPTIONS if opt.section}
_JSON_INDEX: dict[str, Option] = {}
for _opt in OPTIONS:
    for _name in (_opt.json_key, *_opt.json_aliases):
        if _name:
            _JSON_INDEX[_name.lower()] = _opt
del _opt, _name

# Reference sections and JSON keys this implementation does not implement: accepted, ignored, warned about.
IGNORED_INI_SECTIONS = {name.lower(): name for name in ("Reorder", "ReorderRule", "Hybrid", "Advanced")}
IGNORED_JSON_KEYS = frozenset({"reorder", "reorder_rules", "hybrid"})


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything the daemons need, validated. Built by ``load_settings``; constructible directly in tests."""

    mode: str = "client"  # 'client' | 'server'
    server: Endpoint | None = None
    listen: Endpoint = DEFAULT_LISTEN
    subnet: IPv4Network = DEFAULT_SUBNET
    subnet6: IPv6Network | None = None
    tun_name: str = "mqvpn0"
    cert: str | None = None  # a server always has one (default server.crt)
    key: str | None = None  # a server always has one (default server.key)
    ca: str | None = None  # None: the system CA store
    tls_server_name: str | None = None
    insecure: bool = False
    auth_key: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)  # IP addresses, normalised text
    reconnect: bool = True
    reconnect_interval: int = 5
    kill_switch: bool = False
    nat: bool = True
    manage_routes: bool = True
    scheduler: str = "wlb"  # 'wlb' | 'minrtt' | 'backup'
    cc: str = "bbr"  # 'bbr' | 'bbr2' | 'cubic' | 'newreno'
    init_max_path_id: int = 0
    mtu: int = 0  # 0 = automatic
    max_clients: int = 64
    log_level: str = "info"  # 'debug' | 'info' | 'warning' | 'error'
    log_format: str = "text"  # 'text' | 'json'
    metrics: Endpoint | None = None
    qlog_dir: str | None = None
    workers: int = 1
    control_listen: Endpoint | None = None  # accepted for compatibility; unused
    control_addr: str | None = None  # accepted for compatibility; unused
    control_port: int | None = None  # accepted for compatibility; unused
    config_path: str | None = None
    warnings: list[str] = field(default_factory=list)  # to log once logging is set up
    origins: dict[str, str] = field(default_factory=dict)  # field -> where its value came from (non-defaults)

    @property
    def is_server(self) -> bool:
        return self.mode == "server"


# ---------------------------------------------------------------------------------------------------------------
# Where a value came from
# ---------------------------------------------------------------------------------------------------------------


class Origin(NamedTuple):
    source: str  # 'cli' | 'ini' | 'json'
    label: str  # '--mtu' | '[Interface] MTU' | '"mtu"'
    file: str | None = None
    line: int | None = None

    def prefix(self) -> str:
        """Message prefix: 'FILE:LINE' (INI), 'FILE' (JSON) or 'argument --flag' (command line)."""
        if self.source == "ini":
            return f"{self.file}:{self.line}"
        if self.source == "json":
            return f"{self.file}"
        return f"argument {self.label}"

    def __str__(self) -> str:
        if self.source == "ini":
            return f"{self.file}:{self.line} ({self.label})"
        if self.source == "json":
            return f"{self.file} ({self.label})"
        return self.label


def _show(text: str, opt: Option) -> str:
    """A value quoted for a one-line message; secrets hidden, control characters escaped, long values cut."""
    if opt.secret:
        return "(hidden)"
    shown = text if len(text) <= 80 else text[:77] + "..."
    return "'" + shown.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _bad_value(opt: Option, origin: Origin, raw: str, reason: str) -> ConfigError:
    if origin.source == "ini":
        where = f"{opt.ini_key} {_show(raw, opt)} in [{opt.section}]"
        return ConfigError(f"{origin.prefix()}: invalid {where}: {reason}")
    if origin.source == "json":
        return ConfigError(f"{origin.prefix()}: invalid {origin.label} value {_show(raw, opt)}: {reason}")
    return ConfigError(f"{origin.prefix()}: invalid value {_show(raw, opt)}: {reason}")


class ConfigLayer:
    """Values from one source (a config file, or the command line), each with its origin."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[Any, Origin]] = {}
        self.warnings: list[str] = []

    def parse_one(self, opt: Option, raw: str, origin: Origin) -> Any:
        assert opt.parse is not None
        try:
            value = opt.parse(raw)
        except ValueError as exc:
            low = raw.strip().lower()
            if low not in opt.substitutes:
                raise _bad_value(opt, origin, raw, str(exc)) from None
            value = opt.substitutes[low]
            self.warnings.append(
                f"{_where(origin, opt)}: {low!r} is not supported by this implementation; using {value!r}"
            )
        return value

    def set_value(self, opt: Option, value: Any, origin: Origin) -> None:
        previous = self.values.get(opt.name)
        if previous is not None and origin.source != "cli":
            self.warnings.append(f"{_where(origin, opt)}: given again ({previous[1]}); the last one wins")
        self.values[opt.name] = (value, origin)

    def add_items(self, opt: Option, raws: Sequence[str], origin: Origin, *, extend: bool) -> None:
        items = [self.parse_one(opt, raw, origin) for raw in raws]
        if extend and opt.name in self.values:
            items = self.values[opt.name][0] + items
        elif opt.name in self.values and origin.source != "cli":
            self.warnings.append(f"{_where(origin, opt)}: given again ({self.values[opt.name][1]}); the last one wins")
        if opt.max_items is not None and len(items) > opt.max_items:
            raise ConfigError(f"{_where(origin, opt)}: too many entries (at most {opt.max_items})")
        if opt.unique:
            seen: set[Any] = set()
            for item in items:
                if item in seen:
                    raise ConfigError(f"{_where(origin, opt)}: {item} is listed twice")
                seen.add(item)
        self.values[opt.name] = (items, origin)


def _where(origin: Origin, opt: Option) -> str:
    """Message prefix naming the key as well: 'FILE:LINE: Path in [Multipath]', 'FILE: "paths"', 'argument --path'."""
    if origin.source == "ini":
        return f"{origin.prefix()}: {opt.ini_key} in [{opt.section}]"
    if origin.source == "json":
        return f"{origin.prefix()}: {origin.label}"
    return origin.prefix()


def _split_items(opt: Option, raw: str) -> list[str]:
    if opt.item_sep is None:
        return [raw]
    return [part for part in raw.split(opt.item_sep) if part.strip()] or [raw]


# ---------------------------------------------------------------------------------------------------------------
# INI
# ---------------------------------------------------------------------------------------------------------------


def _strip_inline_comment(text: str) -> str:
    """Cut ``text`` (what follows '=') at the first '#' or ';' that follows whitespace."""
    for i in range(1, len(text)):
        if text[i] in "#;" and text[i - 1].isspace():
            return text[:i].rstrip()
    return text


def _read_ini(text: str, path: str) -> ConfigLayer:
    layer = ConfigLayer()
    section: str | None = None  # canonical section name; "" inside an ignored section
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            close = stripped.find("]")
            rest = stripped[close + 1 :].strip() if close >= 0 else ""
            if close < 0 or (rest and rest[0] not in "#;"):
                raise ConfigError(f"{path}:{lineno}: malformed section header (expected [Section])")
            name = stripped[1:close].strip()
            if name.lower() in _INI_SECTIONS:
                section = _INI_SECTIONS[name.lower()]
            elif name.lower() in IGNORED_INI_SECTIONS:
                section = ""
                layer.warnings.append(
                    f"{path}:{lineno}: section [{IGNORED_INI_SECTIONS[name.lower()]}] is not supported by this "
                    "implementation; ignored"
                )
            else:
                raise ConfigError(f"{path}:{lineno}: unknown section [{_printable(name)}]")
            continue
        key, eq, value = stripped.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{path}:{lineno}: expected 'Key = Value' or '[Section]'")
        if section is None:
            raise ConfigError(f"{path}:{lineno}: key '{_printable(key)}' is outside any [Section]")
        if section == "":
            continue
        opt = _INI_INDEX.get((section.lower(), key.lower()))
        if opt is None:
            raise ConfigError(f"{path}:{lineno}: unknown key '{_printable(key)}' in [{section}]")
        value = _strip_inline_comment(value).strip()
        origin = Origin("ini", f"[{opt.section}] {opt.ini_key}", path, lineno)
        if not value:
            raise ConfigError(f"{path}:{lineno}: missing value for {opt.ini_key} in [{opt.section}]")
        if opt.kind == LIST:
            layer.add_items(opt, _split_items(opt, value), origin, extend=opt.ini_repeat)
        else:
            layer.set_value(opt, layer.parse_one(opt, value, origin), origin)
    return layer


def _printable(text: str, limit: int | None = 60) -> str:
    """``text`` for a one-line message: control characters escaped, cut to ``limit`` characters (None: never)."""
    shown = text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
    return shown.encode("unicode_escape").decode("ascii")


# ---------------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------------


def _json_scalar_text(value: Any, opt: Option, origin: Origin) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        if opt.kind == SWITCH:
            return "true" if value else "false"
        raise ConfigError(f"{origin.prefix()}: invalid {origin.label}: expected a string or a number, not a boolean")
    if isinstance(value, (int, float)):
        return json.dumps(value)
    raise ConfigError(f"{origin.prefix()}: invalid {origin.label}: expected a string, number or boolean")


def _json_user_text(item: Any, origin: Origin) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and {k.lower() for k in item} == {"name", "key"}:
        fields = {k.lower(): v for k, v in item.items()}
        if isinstance(fields["name"], str) and isinstance(fields["key"], str):
            return f"{fields['name']}:{fields['key']}"
    raise ConfigError(
        f'{origin.prefix()}: invalid {origin.label}: each user is "NAME:KEY" or {{"name": NAME, "key": KEY}}'
    )


def _read_json(text: str, path: str) -> ConfigLayer:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: invalid JSON config: expected one object {{...}}")
    layer = ConfigLayer()
    for key, value in data.items():
        low = key.lower()
        if low in IGNORED_JSON_KEYS:
            layer.warnings.append(f'{path}: "{low}" is not supported by this implementation; ignored')
            continue
        opt = _JSON_INDEX.get(low)
        if opt is None:
            raise ConfigError(f'{path}: unknown key "{_printable(key)}"')
        origin = Origin("json", f'"{opt.json_key}"', path)
        if low != opt.json_key:
            layer.warnings.append(f'{path}: "{_printable(key)}" is deprecated; use "{opt.json_key}"')
        if value is None:  # null: not set
            continue
        if opt.kind == LIST:
            if isinstance(value, str):
                raws = _split_items(opt, value)
            elif isinstance(value, list):
                if opt.name == "users":
                    raws = [_json_user_text(item, origin) for item in value]
                else:
                    raws = [_json_scalar_text(item, opt, origin) for item in value]
            else:
                raise ConfigError(f"{path}: invalid {origin.label}: expected a list")
            layer.add_items(opt, raws, origin, extend=False)
        else:
            raw = _json_scalar_text(value, opt, origin)
            layer.set_value(opt, layer.parse_one(opt, raw, origin), origin)
    return layer


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def read_config_text(text: str, path: str = "<config>") -> ConfigLayer:
    """Parse config text (JSON if its first non-space character is '{', else INI) into a layer of values."""
    text = text.removeprefix("\ufeff")
    if text.lstrip()[:1] == "{":
        return _read_json(text, path)
    return _read_ini(text, path)


def _read_config_file(path: str) -> ConfigLayer:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{_printable(path, None)}: cannot read config: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: cannot read config: not valid UTF-8") from None
    return read_config_text(text, path)


def _check_readable(path: str, what: str, opt: Option, origin: Origin | None) -> None:
    """ConfigError naming where ``path`` came from unless it can be opened for reading."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        shown = _printable(path, None)
        if origin is None:
            hint = f"the default; give {opt.flags[0]} or [{opt.section}] {opt.ini_key}"
            raise ConfigError(f"cannot read {what} '{shown}' ({hint}): {reason}") from None
        raise ConfigError(f"{_where(origin, opt)}: cannot read {what} '{shown}': {reason}") from None


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser, generated from ``OPTIONS`` (only the flags given appear in the namespace)."""
    parser = _Parser(
        prog="mqvpn",
        description="Multipath QUIC VPN (MASQUE CONNECT-IP), a drop-in replacement for the reference mqvpn.",
        argument_default=argparse.SUPPRESS,
        epilog="Command-line flags override the config file; --path, --dns and --user replace its lists.",
    )
    for opt in OPTIONS:
        if not opt.flags:
            continue
        help_text = opt.help.replace("%", "%%")
        default = opt.default_text()
        if default and opt.kind != SWITCH:
            help_text += f" (default: {default})"
        if opt.kind == ACTION:
            parser.add_argument(*opt.flags, dest=opt.name, action="store_true", help=help_text)
        elif opt.kind == SWITCH:
            if not opt.flag_value:  # the flag turns the setting off: say so (the help text describes the setting)
                help_text = f"do not {help_text}" if not help_text.startswith("do not ") else help_text
            parser.add_argument(*opt.flags, dest=opt.name, action="store_const", const=opt.flag_value, help=help_text)
        elif opt.kind == LIST:
            parser.add_argument(*opt.flags, dest=opt.name, action="append", metavar=opt.metavar, help=help_text)
        else:
            parser.add_argument(*opt.flags, dest=opt.name, metavar=opt.metavar, help=help_text)
    return parser


@dataclass
class CommandLine:
    """The parsed command line: actions requested, and the flags' values as a layer."""

    genkey: bool = False
    status: bool = False
    version: bool = False
    config_path: str | None = None
    layer: ConfigLayer = field(default_factory=ConfigLayer)


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Parse and check the flags (ConfigError on a bad one; SystemExit(0) after --help)."""
    namespace = vars(build_parser().parse_args(list(argv)))
    cmd = CommandLine()
    for opt in OPTIONS:
        if opt.name not in namespace:
            continue
        raw = namespace[opt.name]
        origin = Origin("cli", opt.flags[0])
        if opt.kind == ACTION:
            setattr(cmd, opt.name, bool(raw))
        elif opt.kind == SWITCH:
            cmd.layer.set_value(opt, raw, origin)
        elif opt.kind == LIST:
            raws = [item for text in raw for item in _split_items(opt, text)]
            cmd.layer.add_items(opt, raws, origin, extend=False)
        else:
            cmd.layer.set_value(opt, cmd.layer.parse_one(opt, raw, origin), origin)
    if "config_path" in cmd.layer.values:
        cmd.config_path = cmd.layer.values["config_path"][0]
    return cmd


# ---------------------------------------------------------------------------------------------------------------
# Merging and validation
# ---------------------------------------------------------------------------------------------------------------


def build_settings(cmd: CommandLine) -> Settings:
    """Defaults < config file < flags, then the mode and the combination are checked."""
    layers = []
    if cmd.config_path is not None:
        layers.append(_read_config_file(cmd.config_path))
    layers.append(cmd.layer)

    values: dict[str, tuple[Any, Origin | None]] = {}
    warnings: list[str] = []
    for layer in layers:
        values.update(layer.values)
        warnings.extend(layer.warnings)

    def get(name: str) -> Any:
        entry = values.get(name)
        if entry is None:
            default = _BY_NAME[name].default
            return type(default)(default) if isinstance(default, (list, dict)) else default
        return entry[0]

    def origin_of(name: str) -> Origin | None:
        entry = values.get(name)
        return entry[1] if entry else None

    mode = get("mode")
    if mode is None:
        if "listen" in values:
            mode = "server"
        elif "server" in values:
            mode = "client"
        else:
            raise ConfigError(
                "cannot tell whether to run as client or server: give --mode client|server "
                "(or set [Interface] Listen for a server, [Server] Address for a client)"
            )

    kwargs: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.kind == ACTION:
            continue
        kwargs[opt.name] = get(opt.name)
    kwargs["mode"] = mode
    kwargs["users"] = dict(kwargs["users"])  # list of (name, key): a later entry for a name replaces its key

    for opt in OPTIONS:
        if opt.unsupported and opt.name in values:
            warnings.append(f"{origin_of(opt.name)}: {opt.unsupported}")

    if mode == "server":
        if not kwargs["auth_key"] and not kwargs["users"]:
            raise ConfigError("a server needs --auth-key or --user (refusing to run without authentication)")
        _check_keys(kwargs["auth_key"], kwargs["users"])
        for name, what, default in (
            ("cert", "TLS certificate", DEFAULT_SERVER_CERT),
            ("key", "TLS private key", DEFAULT_SERVER_KEY),
        ):
            if kwargs[name] is None:
                kwargs[name] = default
            _check_readable(kwargs[name], what, _BY_NAME[name], origin_of(name))
    else:
        if kwargs["server"] is None:
            raise ConfigError("a client needs a server address: --server HOST:PORT (or [Server] Address)")
        if kwargs["ca"] is not None:
            _check_readable(kwargs["ca"], "CA file", _BY_NAME["ca"], origin_of("ca"))
            if kwargs["insecure"]:
                warnings.append("--ca is ignored: --insecure turns certificate verification off")

    kwargs["warnings"] = warnings
    kwargs["origins"] = {name: str(origin) for name, (_, origin) in values.items() if origin is not None}
    return Settings(**kwargs)


def _check_keys(auth_key: str | None, users: Mapping[str, str]) -> None:
    from mqvpn.masque.auth import KeyStore

    try:
        KeyStore(auth_key, users)
    except ValueError as exc:
        raise ConfigError(f"invalid authentication settings: {exc}") from None


def load_settings(argv: Sequence[str]) -> Settings:
    """Settings from command-line arguments (and the config file they name). ConfigError on any problem."""
    return build_settings(parse_command_line(argv))


# ---------------------------------------------------------------------------------------------------------------
# Docs
# ---------------------------------------------------------------------------------------------------------------


def render_option_docs() -> str:
    """A markdown table of every option: flag, INI key, JSON key, default and help."""
    rows = [
        "| Flag | INI key | JSON key | Default | Description |",
        "|---|---|---|---|---|",
    ]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    for opt in OPTIONS:
        flag = ""
        if opt.flags:
            flag = ", ".join(f"`{f}`" if opt.kind in (SWITCH, ACTION) else f"`{f} {opt.metavar}`" for f in opt.flags)
        ini = f"`[{opt.section}] {opt.ini_key}`" if opt.ini_key else ""
        if opt.ini_key and opt.ini_repeat:
            ini += " (repeatable)"
        elif opt.ini_key and opt.item_sep:
            ini += " (comma list)"
        jkey = f"`{opt.json_key}`" if opt.json_key else ""
        default = opt.default_text()
        description = opt.help + (f" ({opt.role} only)" if opt.role else "")
        rows.append(f"| {cell(flag)} | {cell(ini)} | {cell(jkey)} | {cell(default)} | {cell(description)} |")
    rows.append("| `-h`, `--help` | | | | show the help and exit |")
    return "\n".join(rows) + "\n"

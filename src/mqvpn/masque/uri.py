"""The CONNECT-IP URI template (RFC 9484 §3): expanding it on the client, matching a request path on the server.

Templates use the RFC 6570 subset RFC 9484 allows: simple ``{var}`` / ``{a,b}`` and form-style query ``{?a,b}`` /
``{&a}`` expressions (level 3), no ``+ # . / ;`` operators, no level-4 modifiers, ASCII only. The variables are
``target`` and ``ipproto``. As an mqvpn convenience the authority may hold ``{host}`` and ``{port}``, filled in by
``expand`` (IPv6 literals bracketed); every other expression must sit in the path or the query.

Values (what ``parse_request_path`` returns and ``expand`` takes):

- target: ``"*"`` (any, also what an empty or absent variable means), an ``IPv4Network`` / ``IPv6Network``
  (a bare address comes back as a /32 or /128), or a host name ``str`` (RFC 3986 reg-name) the proxy must resolve;
- ipproto: ``"*"`` (any) or an ``int`` 0..255.

``expand`` writes ``*`` literally, as every implementation does (``/.well-known/masque/ip/*/*/``), and
percent-encodes everything else that is not unreserved (``2001%3Adb8%3A%3A%2F32``). ``parse_request_path``
decodes both forms. Anything malformed raises ``TemplateError`` (a ValueError): the server answers 400.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

DEFAULT_TEMPLATE = "https://{host}:{port}/.well-known/masque/ip/{target}/{ipproto}/"
DEFAULT_PATH_TEMPLATE = "/.well-known/masque/ip/{target}/{ipproto}/"
WILDCARD = "*"

Target = str | IPv4Network | IPv6Network
IpProto = str | int

_VARIABLES = ("target", "ipproto")
_AUTHORITY_VARIABLES = ("host", "port")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_KEEP_LITERAL = _UNRESERVED | {ord("*")}
_REG_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=")
_DEC_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPPROTO_RE = re.compile(_DEC_OCTET)
_DOTTED_RE = re.compile(r"[0-9.]+")
_VARNAME_RE = re.compile(r"[A-Za-z0-9_]+")
_HEX = "0123456789abcdefABCDEF"
_SENTINEL = "\x00{}\x00"  # stands for a variable while a template is turned into a matcher
_SENTINEL_RE = re.compile(r"\x00(\d+)\x00")


class TemplateError(ValueError):
    """A malformed template, request path, target or ipproto (the server answers 400)."""


# --------------------------------------------------------------------------------------------------------------
# Template syntax


def _tokens(template: str) -> list[str | tuple[str, list[str]]]:
    """Literals and ``(operator, variable names)`` expressions, with RFC 9484's restrictions enforced."""
    if not isinstance(template, str):
        raise TemplateError("template must be a str")
    if not template.isascii() or any(ord(c) < 0x21 or c in '\x7f<>\\^`|"' for c in template):
        raise TemplateError("template holds a character not allowed in a URI")
    out: list[str | tuple[str, list[str]]] = []
    pos = 0
    while pos < len(template):
        brace = template.find("{", pos)
        close = template.find("}", pos)
        if brace < 0:
            if close >= 0:
                raise TemplateError("unmatched '}' in template")
            out.append(template[pos:])
            break
        if 0 <= close < brace:
            raise TemplateError("unmatched '}' in template")
        if brace > pos:
            out.append(template[pos:brace])
        end = template.find("}", brace)
        if end < 0:
            raise TemplateError("unclosed '{' in template")
        body = template[brace + 1 : end]
        if "{" in body:
            raise TemplateError("nested '{' in template")
        operator = body[:1] if body[:1] in "?&+#./;=,!@|" and body else ""
        if operator and operator not in "?&":
            raise TemplateError(f"operator {operator!r} is not allowed in a CONNECT-IP template")
        names = body[len(operator) :].split(",")
        for name in names:
            if not _VARNAME_RE.fullmatch(name):
                raise TemplateError(f"bad variable {name!r} in template (level-4 modifiers are not allowed)")
        out.append((operator, names))
        pos = end + 1
    return out


def split_template(template: str) -> tuple[str, str]:
    """``(authority template, path-and-query template)`` of an absolute https template."""
    if not isinstance(template, str) or template[:8].lower() != "https://":
        raise TemplateError("template must be an absolute https URI")
    rest = template[8:]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority:
        raise TemplateError("template has an empty authority")
    if not path.startswith("/"):
        raise TemplateError("template path must start with '/'")
    for token in _tokens(authority):
        if isinstance(token, tuple) and (token[0] or any(n not in _AUTHORITY_VARIABLES for n in token[1])):
            raise TemplateError("only {host} and {port} may appear in the template's authority")
        if isinstance(token, str) and ("@" in token or "#" in token):
            raise TemplateError("template authority must be host[:port]")
    _tokens(path)
    if "#" in path:
        raise TemplateError("template must not have a fragment")
    return authority, path


def _path_template(template: str) -> str:
    if not isinstance(template, str):
        raise TemplateError("template must be a str")
    if template[:8].lower() == "https://":
        return split_template(template)[1]
    if not template.startswith("/"):
        raise TemplateError("path template must start with '/'")
    _tokens(template)
    return template


# --------------------------------------------------------------------------------------------------------------
# Values


def _pct_encode(text: str) -> str:
    return "".join(chr(b) if b in _KEEP_LITERAL else f"%{b:02X}" for b in text.encode("ascii"))


def _pct_decode(text: str) -> str:
    if not text.isascii():
        raise TemplateError("non-ASCII character in request path")
    if "%" not in text:
        return text
    out = bytearray()
    pos = 0
    while pos < len(text):
        c = text[pos]
        if c == "%":
            pair = text[pos + 1 : pos + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise TemplateError("bad percent-encoding in request path")
            out.append(int(pair, 16))
            pos += 3
        else:
            out.append(ord(c))
            pos += 1
    if not out.isascii():
        raise TemplateError("percent-encoded non-ASCII byte in request path")
    return out.decode("ascii")


def parse_target(text: str) -> Target:
    """A decoded target value: ``*`` | IPv4address[/1*2DIGIT] | IPv6address[/1*3DIGIT] | reg-name."""
    if text in ("", WILDCARD):
        return WILDCARD
    if "/" in text:
        address, _, length = text.partition("/")
        v6 = ":" in address
        if not length.isdigit() or not length.isascii() or not 1 <= len(length) <= (3 if v6 else 2):
            raise TemplateError(f"bad prefix length in target {text!r}")
        network_class, bits = (IPv6Network, 128) if v6 else (IPv4Network, 32)
        base = _parse_address(address, v6)
        if int(length) > bits:
            raise TemplateError(f"prefix length {length} is longer than the address in target {text!r}")
        try:
            return network_class((base, int(length)))  # strict: host bits must be zero
        except ValueError:
            raise TemplateError(f"host bits set in target {text!r}") from None
    if ":" in text:
        return IPv6Network(_parse_address(text, True))
    if _DOTTED_RE.fullmatch(text):  # all digits and dots: an IPv4 address or nothing
        return IPv4Network(_parse_address(text, False))
    if len(text) > 253 or any(c not in _REG_NAME_CHARS for c in text):
        raise TemplateError(f"target {text!r} is not an address or a host name")
    return text


def _parse_address(text: str, v6: bool) -> IPv4Address | IPv6Address:
    if "%" in text or not text.isascii():  # no zone ids
        raise TemplateError(f"bad IP address {text!r} in target")
    try:
        return IPv6Address(text) if v6 else IPv4Address(text)
    except ValueError:
        raise TemplateError(f"bad IP address {text!r} in target") from None


def parse_ipproto(text: str) -> IpProto:
    """A decoded ipproto value: ``*`` or a decimal 0..255 without leading zeros."""
    if text in ("", WILDCARD):
        return WILDCARD
    if not _IPPROTO_RE.fullmatch(text):
        raise TemplateError(f"bad ipproto {text!r}")
    return int(text)


def format_target(target: object) -> str:
    """The canonical (decoded) text of a target given as ``*``, an address, a network or a string."""
    if isinstance(target, (IPv4Address, IPv6Address)):
        return str(target)
    if isinstance(target, (IPv4Network, IPv6Network)):
        full = target.prefixlen == target.max_prefixlen
        return str(target.network_address) if full else str(target)
    if isinstance(target, str):
        parsed = parse_target(target)
        return parsed if isinstance(parsed, str) else format_target(parsed)  # "*" and host names as they are
    raise TemplateError(f"bad target {target!r}")


def format_ipproto(ipproto: object) -> str:
    if isinstance(ipproto, bool):
        raise TemplateError(f"bad ipproto {ipproto!r}")
    if isinstance(ipproto, int):
        if not 0 <= ipproto <= 255:
            raise TemplateError(f"ipproto {ipproto} is not 0..255")
        return str(ipproto)
    if isinstance(ipproto, str):
        return str(parse_ipproto(ipproto))
    raise TemplateError(f"bad ipproto {ipproto!r}")


# --------------------------------------------------------------------------------------------------------------
# Expansion (client)


def _expand_tokens(tokens, values: dict[str, str]) -> str:
    out = []
    for token in tokens:
        if isinstance(token, str):
            out.append(token)
            continue
        operator, names = token
        defined = [n for n in names if n in values]
        if not defined:
            continue
        if operator == "":
            out.append(",".join(values[n] for n in defined))
        else:
            out.append(operator + "&".join(f"{n}={values[n]}" for n in defined))
    return "".join(out)


def _format_host(host: str) -> str:
    if not isinstance(host, str) or not host:
        raise TemplateError("host must be a non-empty str")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare:
        try:
            IPv6Address(bare)
        except ValueError:
            raise TemplateError(f"bad IPv6 host literal {host!r}") from None
        return f"[{bare}]"
    if not bare.isascii() or any(c not in _REG_NAME_CHARS for c in bare):
        raise TemplateError(f"bad host {host!r}")
    return bare


def expand(
    template: str = DEFAULT_TEMPLATE,
    host: str | None = None,
    port: int | str | None = None,
    target: object = WILDCARD,
    ipproto: object = WILDCARD,
) -> tuple[str, str]:
    """``(:authority, :path)`` for a CONNECT-IP request. ``host``/``port`` fill ``{host}``/``{port}``."""
    authority_template, path_template = split_template(template)
    values: dict[str, str] = {}
    if host is not None:
        values["host"] = _format_host(host)
    if port is not None:
        text = str(port)
        if isinstance(port, bool) or not text.isdigit() or not text.isascii() or not 0 < int(text) < 65536:
            raise TemplateError(f"bad port {port!r}")
        values["port"] = str(int(text))
    authority_tokens = _tokens(authority_template)
    for token in authority_tokens:
        if isinstance(token, tuple) and any(n not in values for n in token[1]):
            raise TemplateError(f"template needs {', '.join(token[1])} for its authority")
    authority = _expand_tokens(authority_tokens, values)
    path_values = {
        "target": _pct_encode(format_target(target)),
        "ipproto": _pct_encode(format_ipproto(ipproto)),
    }
    return authority, _expand_tokens(_tokens(path_template), path_values)


# --------------------------------------------------------------------------------------------------------------
# Matching (server)


class _Matcher:
    """A path template compiled for matching: a regex over the path (one group per variable occurrence) and,
    for the query, the expected ``key=value`` pairs (each value a variable or a literal)."""

    def __init__(self, path_template: str) -> None:
        pattern: list[str] = []
        self.groups: list[str] = []
        self.query: list[tuple[str, str | None, str | None]] = []  # (key, variable, literal)
        self.has_query = False
        query_text: list[str] = []  # the query rendered with a sentinel per variable
        query_vars: list[str] = []
        for token in _tokens(path_template):
            if not self.has_query:
                if isinstance(token, str):
                    before, question, after = token.partition("?")
                    pattern.append(re.escape(before))
                    if question:
                        self.has_query = True
                        query_text.append(after)
                    continue
                operator, names = token
                if operator == "&":
                    raise TemplateError("'{&...}' outside the query in template")
                if operator == "":
                    group = "([^/?#]*)" if len(names) == 1 else "([^/?#,]*)"
                    pattern.append(",".join([group] * len(names)))
                    self.groups += names
                    continue
                self.has_query = True  # a "{?...}" expression starts the query
            if isinstance(token, str):
                query_text.append(token)
                continue
            operator, names = token
            marks = []
            for name in names:
                marks.append(_SENTINEL.format(len(query_vars)))
                query_vars.append(name)
            if operator == "":
                query_text.append(",".join(marks))
            else:
                query_text.append("&" + "&".join(f"{n}={m}" for n, m in zip(names, marks)))  # "?" or "&" form
        self.regex = re.compile("".join(pattern))
        for pair in filter(None, "".join(query_text).split("&")):
            key, _, value = pair.partition("=")
            whole = _SENTINEL_RE.fullmatch(value)
            if _SENTINEL_RE.search(key) or (whole is None and _SENTINEL_RE.search(value)):
                raise TemplateError("unsupported template: a query variable must be a whole parameter value")
            self.query.append((key, query_vars[int(whole.group(1))], None) if whole else (key, None, value))


def _set_variable(raw: dict[str, str], name: str, value: str) -> None:
    if raw.setdefault(name, value) != value:
        raise TemplateError(f"variable {name!r} given twice with different values")


def parse_request_path(path: str | bytes, template: str = DEFAULT_PATH_TEMPLATE) -> tuple[Target, IpProto]:
    """``(target, ipproto)`` from a request's ``:path`` matched against ``template`` (a path template or a full
    https template). Absent or empty variables mean ``*``. Raises TemplateError if the path does not conform."""
    if isinstance(path, bytes):
        try:
            path = path.decode("ascii")
        except UnicodeDecodeError:
            raise TemplateError("non-ASCII request path") from None
    if not isinstance(path, str) or not path.isascii():
        raise TemplateError("request path must be ASCII text")
    if "#" in path or any(ord(c) < 0x21 or ord(c) == 0x7F for c in path):
        raise TemplateError("request path holds a character not allowed in a URI")
    matcher = _Matcher(_path_template(template))
    request_path, has_query, request_query = path.partition("?")
    match = matcher.regex.fullmatch(request_path)
    if match is None:
        raise TemplateError("request path does not match the URI template")
    raw: dict[str, str] = {}
    for name, value in zip(matcher.groups, match.groups()):
        _set_variable(raw, name, value)
    if has_query and not matcher.has_query:
        raise TemplateError("request has a query the template does not")
    pairs: dict[str, str] = {}
    for pair in filter(None, request_query.split("&")):
        key, _, value = pair.partition("=")
        if key in pairs:
            raise TemplateError(f"query parameter {key!r} repeated")
        pairs[key] = value
    for key, variable, literal in matcher.query:
        value = pairs.pop(key, None)
        if variable is None:
            if value != literal:
                raise TemplateError(f"query parameter {key!r} missing or wrong")
        elif value is not None:
            _set_variable(raw, variable, value)
    if pairs:
        raise TemplateError(f"unexpected query parameter {next(iter(pairs))!r}")
    target = parse_target(_pct_decode(raw.get("target", "")))
    ipproto = parse_ipproto(_pct_decode(raw.get("ipproto", "")))
    return target, ipproto


__all__ = [
    "DEFAULT_PATH_TEMPLATE",
    "DEFAULT_TEMPLATE",
    "WILDCARD",
    "TemplateError",
    "expand",
    "format_ipproto",
    "format_target",
    "parse_ipproto",
    "parse_request_path",
    "parse_target",
    "split_template",
]

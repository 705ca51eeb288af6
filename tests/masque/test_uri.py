from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqvpn.masque.uri import (
    DEFAULT_PATH_TEMPLATE,
    DEFAULT_TEMPLATE,
    WILDCARD,
    TemplateError,
    expand,
    format_target,
    parse_request_path,
    parse_target,
    split_template,
)

P = "/.well-known/masque/ip/"


# ---------------------------------------------------------------------------------------------------------------
# expand


def test_full_tunnel_request():
    assert expand(DEFAULT_TEMPLATE, "proxy.example", 443) == ("proxy.example:443", P + "*/*/")
    assert expand(DEFAULT_TEMPLATE, "proxy.example", "4433") == ("proxy.example:4433", P + "*/*/")


def test_ipv6_host_is_bracketed():
    assert expand(DEFAULT_TEMPLATE, "2001:db8::1", 443)[0] == "[2001:db8::1]:443"
    assert expand(DEFAULT_TEMPLATE, "[2001:db8::1]", 443)[0] == "[2001:db8::1]:443"
    assert expand(DEFAULT_TEMPLATE, "192.0.2.1", 443)[0] == "192.0.2.1:443"
    for bad in ("[2001:db8::zz]", "2001:db8:::1", "", "a b", "h\u00e9"):
        with pytest.raises(TemplateError):
            expand(DEFAULT_TEMPLATE, bad, 443)


@pytest.mark.parametrize("port", [0, 65536, -1, "x", "44 3", True, "\u0663"])
def test_bad_port(port):
    with pytest.raises(TemplateError):
        expand(DEFAULT_TEMPLATE, "h", port)


def test_host_and_port_needed_by_template():
    with pytest.raises(TemplateError):
        expand(DEFAULT_TEMPLATE)
    with pytest.raises(TemplateError):
        expand(DEFAULT_TEMPLATE, "h")
    # a literal authority (what connect-ip-go's -template gives) needs neither, and ignores them
    assert expand("https://localhost:4433/masque/ip/{target}/{ipproto}/") == ("localhost:4433", "/masque/ip/*/*/")


@pytest.mark.parametrize(
    "target, ipproto, path",
    [
        ("*", "*", P + "*/*/"),
        ("192.0.2.1", 6, P + "192.0.2.1/6/"),
        (ip_address("192.0.2.1"), "17", P + "192.0.2.1/17/"),
        (ip_network("192.0.2.0/24"), 0, P + "192.0.2.0%2F24/0/"),
        ("2001:db8::42", "*", P + "2001%3Adb8%3A%3A42/*/"),
        ("2001:db8::/32", 255, P + "2001%3Adb8%3A%3A%2F32/255/"),
        (IPv6Network("2001:db8::42/128"), 1, P + "2001%3Adb8%3A%3A42/1/"),
        ("target.example", "*", P + "target.example/*/"),
        ("", "", P + "*/*/"),
    ],
)
def test_expand_values(target, ipproto, path):
    assert expand(DEFAULT_TEMPLATE, "p", 1, target, ipproto)[1] == path


@pytest.mark.parametrize(
    "target", ["192.0.2.1/24", "10.0.0.0/33", "2001:db8::1/64", "01.2.3.4", "1.2.3", "::g", "a/b", "h\u00e9", 3, None]
)
def test_expand_rejects_bad_target(target):
    with pytest.raises(TemplateError):
        expand(DEFAULT_TEMPLATE, "p", 1, target)


@pytest.mark.parametrize("ipproto", [256, -1, "06", "x", "", True, 1.0, None])
def test_expand_rejects_bad_ipproto(ipproto):
    if ipproto == "":
        assert expand(DEFAULT_TEMPLATE, "p", 1, ipproto=ipproto)[1] == P + "*/*/"  # empty means any
        return
    with pytest.raises(TemplateError):
        expand(DEFAULT_TEMPLATE, "p", 1, ipproto=ipproto)


def test_query_templates():
    assert expand("https://p.example/ip{?target,ipproto}", None, None, "10.0.0.0/8", 6) == (
        "p.example",
        "/ip?target=10.0.0.0%2F8&ipproto=6",
    )
    assert expand("https://p.example/ip?x=1{&target}{&ipproto}")[1] == "/ip?x=1&target=*&ipproto=*"
    assert expand("https://p.example/ip?t={target}&i={ipproto}")[1] == "/ip?t=*&i=*"
    assert expand("https://p.example/ip/{target,ipproto}")[1] == "/ip/*,*"
    assert expand("https://p.example/ip/{target}/{other}/")[1] == "/ip/*//"  # undefined variables expand to ""


@pytest.mark.parametrize(
    "template",
    [
        "http://p/{target}/{ipproto}/",  # not https
        "https:///{target}/",  # empty authority
        "https://p",  # no path
        "https://p?{target}",  # path must start with "/"
        "https://{target}/x",  # variables only in the path or query
        "https://{?host}/x",
        "https://p/{+target}/",  # forbidden operators
        "https://p/{#target}/",
        "https://p/{.target}/",
        "https://p/{/target}/",
        "https://p/{;target}/",
        "https://p/{target:3}/",  # level 4
        "https://p/{target*}/",
        "https://p/{target/",  # syntax
        "https://p/target}/",
        "https://p/{}/",
        "https://p/{ta{rget}/",
        "https://p/\u00e9/{target}/",  # non-ASCII
        "https://p/a b/{target}/",
        "https://p/x#frag",
        "https://u@p/{target}/",
        "",
        None,
    ],
)
def test_bad_templates(template):
    with pytest.raises(TemplateError):
        expand(template, "h", 1)
    with pytest.raises(TemplateError):
        parse_request_path(P + "*/*/", template)


def test_split_template():
    assert split_template(DEFAULT_TEMPLATE) == ("{host}:{port}", DEFAULT_PATH_TEMPLATE)
    assert split_template("HTTPS://p:1/x?y={target}") == ("p:1", "/x?y={target}")


# ---------------------------------------------------------------------------------------------------------------
# parse_request_path


@pytest.mark.parametrize(
    "path, target, ipproto",
    [
        (P + "*/*/", "*", "*"),
        (P + "%2A/%2a/", "*", "*"),
        (P + "//", "*", "*"),  # absent variables mean "*"
        (P + "192.0.2.1/6/", IPv4Network("192.0.2.1/32"), 6),
        (P + "192.0.2.0%2F24/17/", IPv4Network("192.0.2.0/24"), 17),
        (P + "192.0.2.0%2f24/0/", IPv4Network("192.0.2.0/24"), 0),
        (P + "0.0.0.0%2F0/255/", IPv4Network("0.0.0.0/0"), 255),
        (P + "10.0.0.0%2F08/*/", IPv4Network("10.0.0.0/8"), "*"),  # 1*2DIGIT
        (P + "2001%3Adb8%3A%3A42/*/", IPv6Network("2001:db8::42/128"), "*"),
        (P + "2001%3adb8%3a%3a%2f32/1/", IPv6Network("2001:db8::/32"), 1),
        (P + "2001:db8::42/58/", IPv6Network("2001:db8::42/128"), 58),  # ":" is legal unencoded in a path
        (P + "%3A%3A%2F0/*/", IPv6Network("::/0"), "*"),
        (P + "%3A%3Affff%3A192.0.2.1/*/", IPv6Network("::ffff:c000:201/128"), "*"),
        (P + "2001%3Adb8%3A%3A%2F032/*/", IPv6Network("2001:db8::/32"), "*"),  # 1*3DIGIT
        (P + "target.example/*/", "target.example", "*"),
        (P + "xn--bcher-kva.example./*/", "xn--bcher-kva.example.", "*"),
        (P + "t%2Eexample/*/", "t.example", "*"),
    ],
)
def test_parse_good_paths(path, target, ipproto):
    assert parse_request_path(path) == (target, ipproto)
    assert parse_request_path(path, DEFAULT_TEMPLATE) == (target, ipproto)
    assert parse_request_path(path.encode()) == (target, ipproto)


@pytest.mark.parametrize(
    "path",
    [
        P + "*/*",  # no trailing slash
        P + "*/",
        "/.well-known/masque/ip/*/*/extra",
        "/.well-known/masque/udp/*/*/",
        P + "*/*/?x=1",  # a query the template does not have
        P + "192.0.2.0/24/6/",  # an unencoded "/" splits the segment
        P + "192.0.2.1%2F24/*/",  # host bits set
        P + "192.0.2.0%2F33/*/",  # prefix too long
        P + "192.0.2.0%2F/*/",
        P + "192.0.2.0%2F123/*/",  # 1*2DIGIT
        P + "192.0.2.0%2F-1/*/",
        P + "192.0.2.0%2F%2B8/*/",
        P + "192.0.2.0%2F%D9%A3/*/",
        P + "2001%3Adb8%3A%3A1%2F64/*/",  # host bits set
        P + "2001%3Adb8%3A%3A%2F129/*/",
        P + "2001%3Adb8%3A%3A%2F0032/*/",  # 1*3DIGIT
        P + "fe80%3A%3A1%25eth0/*/",  # zone ids are not IPv6address
        P + "2001%3Adb8%3A%3Ag/*/",
        P + "1.2.3/*/",  # dotted digits are an IPv4 address or nothing
        P + "01.2.3.4/*/",  # dec-octet has no leading zeros
        P + "256.1.1.1/*/",
        P + "a%20b/*/",  # not a reg-name
        P + "a%2Fb/*/",
        P + "%C3%A9.example/*/",  # non-ASCII
        P + "%zz/*/",  # bad escapes
        P + "%2/*/",
        P + "*/06/",  # ipproto is a dec-octet
        P + "*/256/",
        P + "*/-1/",
        P + "*/tcp/",
        P + "*/%2B6/",
        P + "*/*/#f",
        "",
        "*",
        P + "\u00e9/*/",
        (P + "\xe9/*/").encode("latin-1"),
        P + "*/\x00/",
        P + "x" * 254 + "/*/",
    ],
)
def test_parse_bad_paths(path):
    with pytest.raises(TemplateError):
        parse_request_path(path)


def test_template_error_is_a_value_error():
    assert issubclass(TemplateError, ValueError)


def test_parse_with_query_templates():
    form = "https://p.example/ip{?target,ipproto}"
    assert parse_request_path("/ip?target=10.0.0.0%2F8&ipproto=6", form) == (IPv4Network("10.0.0.0/8"), 6)
    assert parse_request_path("/ip?ipproto=6&target=10.0.0.0%2F8", form) == (IPv4Network("10.0.0.0/8"), 6)
    assert parse_request_path("/ip?ipproto=6", form) == ("*", 6)
    assert parse_request_path("/ip", form) == ("*", "*")
    assert parse_request_path("/ip?", form) == ("*", "*")
    for bad in ("/ip?target=1&target=2", "/ip?foo=1", "/ip?target=x%2Fy", "/ip/?target=*", "/ipx"):
        with pytest.raises(TemplateError):
            parse_request_path(bad, form)
    literal = "/m?v=1&t={target}&i={ipproto}"
    assert parse_request_path("/m?t=example.com&i=17&v=1", literal) == ("example.com", 17)
    for bad in ("/m?t=example.com&i=17", "/m?t=example.com&i=17&v=2"):
        with pytest.raises(TemplateError):
            parse_request_path(bad, literal)
    with pytest.raises(TemplateError):  # a variable inside a query value, not the whole value
        parse_request_path("/m?t=x1", "/m?t=x{target}")
    multi = "/ip/{target,ipproto}/"
    assert parse_request_path("/ip/10.0.0.1,6/", multi) == (IPv4Network("10.0.0.1/32"), 6)
    twice = "/ip/{target}/{target}/"
    assert parse_request_path("/ip/a.example/a.example/", twice) == ("a.example", "*")
    with pytest.raises(TemplateError):
        parse_request_path("/ip/a.example/b.example/", twice)


def test_parse_target_direct():
    assert parse_target("*") == WILDCARD
    assert parse_target("10.1.0.0/16") == IPv4Network("10.1.0.0/16")
    assert format_target(IPv4Network("10.1.0.0/16")) == "10.1.0.0/16"
    assert format_target("2001:DB8::1") == "2001:db8::1"


# ---------------------------------------------------------------------------------------------------------------
# Round trips and fuzzing

hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}", fullmatch=True
).filter(lambda h: not all(c.isdigit() or c == "." for c in h))


@st.composite
def networks(draw):
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    plen = draw(st.integers(0, bits))
    addr = draw(st.integers(0, (1 << bits) - 1))
    addr = addr >> (bits - plen) << (bits - plen) if plen else 0
    return (IPv4Network if version == 4 else IPv6Network)((addr, plen))


targets = st.one_of(st.just("*"), networks(), hostnames)
ipprotos = st.one_of(st.just("*"), st.integers(0, 255))
templates = st.sampled_from(
    [
        DEFAULT_TEMPLATE,
        "https://p.example:443/ip{?target,ipproto}",
        "https://p.example/x/{ipproto}/y/{target}",
        "https://{host}/m?v=1&t={target}&i={ipproto}",
        "https://{host}:{port}/a{?ipproto}{&target}",
    ]
)


@given(templates, targets, ipprotos)
def test_expand_parse_round_trip(template, target, ipproto):
    authority, path = expand(template, "h.example", 8443, target, ipproto)
    assert authority in ("h.example:8443", "h.example", "p.example:443", "p.example")
    assert path.isascii() and " " not in path
    assert parse_request_path(path, template) == (target, ipproto)


@settings(max_examples=1000)
@given(st.text(max_size=80))
def test_fuzz_paths_only_template_error(text):
    for candidate in (text, P + text, P + text + "/*/", P + "*/" + text + "/"):
        try:
            target, ipproto = parse_request_path(candidate)
        except TemplateError:
            continue
        assert target == "*" or isinstance(target, (IPv4Network, IPv6Network, str))
        assert ipproto == "*" or 0 <= ipproto <= 255


@settings(max_examples=500)
@given(st.text(alphabet="%2AaFf3:./0123456789*g", max_size=30), st.text(alphabet="%2Aa0123456789*-+", max_size=6))
def test_fuzz_near_valid_values(target, ipproto):
    try:
        parse_request_path(f"{P}{target}/{ipproto}/")
    except TemplateError:
        pass


@settings(max_examples=500)
@given(st.text(max_size=60), st.text(max_size=40))
def test_fuzz_templates_only_template_error(template, path):
    for t in (template, "https://" + template, "https://p/" + template):
        try:
            expand(t, "h", 1, "10.0.0.0/8", 6)
        except TemplateError:
            pass
        try:
            parse_request_path("/" + path, t)
        except TemplateError:
            pass

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqvpn.masque import auth
from mqvpn.masque.auth import GLOBAL_USER, KeyStore, generate_key, parse_user_spec


def test_generate_key_format():
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert len(key) == 44 and key.endswith("=") and not key.endswith("==")
        assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", key)
        assert len(base64.b64decode(key, validate=True)) == 32


def test_global_key():
    key = generate_key()
    store = KeyStore(key)
    assert store.auth_required and store.has_global_key
    assert store.authenticate(f"Bearer {key}") == GLOBAL_USER == ""
    assert store.authenticate(f"Bearer {key}".encode()) == ""
    assert store.authenticate(bytearray(f"Bearer {key}".encode())) == ""
    assert store.list_users() == []


def test_key_is_used_verbatim_not_decoded():
    key = generate_key()
    store = KeyStore(key)
    raw = base64.b64decode(key)
    assert store.authenticate(b"Bearer " + raw) is None
    assert store.authenticate("Bearer " + key.rstrip("=")) is None  # unpadded is another string


def test_users():
    alice, bob = generate_key(), generate_key()
    store = KeyStore(None, {"alice": alice, "bob": bob})
    assert not store.has_global_key
    assert store.list_users() == ["alice", "bob"]
    assert store.authenticate("Bearer " + alice) == "alice"
    assert store.authenticate("Bearer " + bob) == "bob"
    carol = generate_key()
    store.add_user("carol", carol)
    assert store.authenticate("Bearer " + carol) == "carol"
    assert store.remove_user("bob") is True
    assert store.remove_user("bob") is False
    assert store.remove_user(GLOBAL_USER) is False
    assert store.authenticate("Bearer " + bob) is None
    assert store.list_users() == ["alice", "carol"]
    new_alice = generate_key()
    store.add_user("alice", new_alice)  # replace
    assert store.authenticate("Bearer " + alice) is None
    assert store.authenticate("Bearer " + new_alice) == "alice"
    store.add_user("alice", new_alice)  # same key again: fine
    assert len(store) == 2


def test_global_and_users_together():
    g, u = generate_key(), generate_key()
    store = KeyStore(g, {"u": u})
    assert store.authenticate("Bearer " + g) == ""
    assert store.authenticate("Bearer " + u) == "u"
    assert store.remove_user("u")
    assert store.authenticate("Bearer " + g) == ""


def test_duplicate_keys_refused():
    g = generate_key()
    store = KeyStore(g, {"a": "k1"})
    with pytest.raises(ValueError, match="global key"):
        store.add_user("b", g)
    with pytest.raises(ValueError, match="'a'"):
        store.add_user("b", "k1")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        b"",
        "Bearer",
        "Bearer ",
        "bearer KEY",  # the prefix is exact
        "BEARER KEY",
        "Bearer  KEY",  # two spaces: the token would be " KEY"
        "Bearer\tKEY",
        "Basic KEY",
        "KEY",
        " Bearer KEY",
        "Bearer KEY ",
        "Bearer KEYX",
        "Bearer KE",
        "Bearer \u00fcKEY",
        "Bearer \ud800",  # a lone surrogate cannot be encoded
        12345,
        ["Bearer KEY"],
    ],
)
def test_rejections(header):
    store = KeyStore("KEY", {"user": "OTHER"})
    assert store.authenticate("Bearer KEY") == ""
    assert store.authenticate(header) is None


def test_unicode_keys():
    store = KeyStore(None, {"jos\u00e9": "cl\u00e9-\u043a\u043b\u044e\u0447"})
    assert store.authenticate("Bearer cl\u00e9-\u043a\u043b\u044e\u0447") == "jos\u00e9"
    assert store.authenticate("Bearer cl\u00e9-\u043a\u043b\u044e\u0447".encode()) == "jos\u00e9"
    assert store.authenticate("Bearer cl\u00e9-\u043a\u043b\u044e\u0447".encode("latin-1", "replace")) is None


def test_empty_store_admits_nobody():
    store = KeyStore()
    assert not store.auth_required
    assert store.authenticate("Bearer ") is None
    assert store.authenticate("Bearer anything") is None


@pytest.mark.parametrize("key", ["", " k", "k ", "a\nb", "a\x00b", "a\x7fb", None, 5])
def test_bad_keys(key):
    error = ValueError if isinstance(key, str) else TypeError
    if key is not None:  # None is "no global key"
        with pytest.raises(error):
            KeyStore(key)
    with pytest.raises(error):
        KeyStore(None, {"u": key})


@pytest.mark.parametrize("name", ["", "a:b", "a b", "a\tb", "\x00", None])
def test_bad_names(name):
    with pytest.raises(ValueError if isinstance(name, str) else TypeError):
        KeyStore().add_user(name, "key")


def test_many_users():
    keys = {f"user{i}": generate_key() for i in range(1000)}
    store = KeyStore(generate_key(), keys)
    assert len(store.list_users()) == 1000
    for name in ("user0", "user499", "user999"):
        assert store.authenticate("Bearer " + keys[name]) == name
    assert store.authenticate("Bearer " + generate_key()) is None


def test_every_key_compared_no_early_exit(monkeypatch):
    """Whatever the outcome, the check compares equal-length digests against every stored key."""
    calls = []

    def counting(a, b):
        calls.append((len(a), len(b)))
        return auth.hmac.compare_digest(a, b)

    monkeypatch.setattr(auth, "_compare", counting)
    keys = {f"u{i}": generate_key() for i in range(20)}
    g = "short"
    store = KeyStore(g, keys)
    for header in [
        "Bearer " + g,
        "Bearer " + keys["u0"],
        "Bearer " + keys["u19"],
        "Bearer nope",
        "Bearer " + "x" * 500,
    ]:
        calls.clear()
        store.authenticate(header)
        assert len(calls) == 21
        assert set(calls) == {(32, 32)}  # digests: the key lengths never reach the comparison
    calls.clear()
    store.authenticate("Basic xyz")  # malformed headers are rejected before any comparison
    assert calls == []


def test_parse_user_spec():
    assert parse_user_spec("alice:KEY") == ("alice", "KEY")
    key = generate_key()
    assert parse_user_spec(f"bob:{key}") == ("bob", key)
    assert parse_user_spec("carol:a:b") == ("carol", "a:b")  # split at the first ':'
    with pytest.raises(ValueError, match="no ':'"):
        parse_user_spec("alice")
    with pytest.raises(ValueError, match="empty NAME"):
        parse_user_spec(":KEY")
    with pytest.raises(ValueError, match="empty KEY"):
        parse_user_spec("alice:")
    with pytest.raises(ValueError, match="whitespace"):
        parse_user_spec("al ice:KEY")
    with pytest.raises(ValueError, match="whitespace"):
        parse_user_spec("alice: KEY")
    with pytest.raises(TypeError):
        parse_user_spec(None)


@settings(max_examples=300)
@given(st.one_of(st.none(), st.text(max_size=60), st.binary(max_size=60)))
def test_fuzz_authenticate_never_raises(header):
    store = KeyStore("global", {"u": "userkey"})
    result = store.authenticate(header)
    if result is not None:
        assert header in ("Bearer global", b"Bearer global", "Bearer userkey", b"Bearer userkey")


@given(st.text(min_size=1, max_size=40))
def test_fuzz_parse_user_spec_only_value_error(spec):
    try:
        name, key = parse_user_spec(spec)
    except ValueError:
        return
    assert f"{name}:{key}" == spec
    assert KeyStore(None, {name: key}).authenticate(("Bearer " + key).encode()) == name

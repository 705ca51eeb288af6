"""nft: tables installed, replaced and deleted; NAT and the kill switch doing their job between namespaces."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time

import pytest

from mqvpn.linux import nft
from mqvpn.linux.netlink import Netlink
from mqvpn.linux.nft import NftError
from tests.linux.conftest import inside, needs_nft, needs_tun

pytestmark = needs_nft


def nft_tables() -> set[tuple[str, str]]:
    out = json.loads(subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, check=True).stdout)
    return {(t["table"]["family"], t["table"]["name"]) for t in out["nftables"] if "table" in t}


def nft_table(name: str) -> list[dict]:
    out = subprocess.run(["nft", "-j", "list", "table", "inet", name], capture_output=True, check=True).stdout
    return json.loads(out)["nftables"]


def link_pair(here: str, there: str, there_ns: str, here_cidrs: list[str], there_cidrs: list[str]) -> None:
    """A veth pair: ``here`` in this namespace, ``there`` moved into ``there_ns``; addresses, both up."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("add", ifname=here, kind="veth", peer=there)
        ipr.link("set", index=ipr.link_lookup(ifname=there)[0], net_ns_fd=there_ns)
    with Netlink() as nl:
        for cidr in here_cidrs:
            nl.add_address(here, cidr)
        nl.set_link(here, up=True)
    with inside(there_ns), Netlink() as nl:
        for cidr in there_cidrs:
            nl.add_address(there, cidr)
        nl.set_link(there, up=True)


def udp_socket(addr: tuple) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.setblocking(False)
    return sock


def received(sock: socket.socket, timeout: float = 1.0) -> tuple[bytes, tuple] | None:
    if select.select([sock], [], [], timeout)[0]:
        return sock.recvfrom(2048)
    return None


def ping(address: str) -> bool:
    cmd = ["ping", "-6" if ":" in address else "-4", "-c", "1", "-W", "1", address]
    return subprocess.run(cmd, capture_output=True).returncode == 0


# --- tables ---------------------------------------------------------------------------------------------------
def test_nat_table_installed_replaced_deleted(netns):
    nft.install_nat("mqvpn_nat", "10.8.0.0/24", "fd00:8::/64", tun_name="mqt0")
    assert ("inet", "mqvpn_nat") in nft_tables()
    assert nft.table_exists("mqvpn_nat") and not nft.table_exists("mqvpn_nat", "ip")
    items = nft_table("mqvpn_nat")
    chains = {c["chain"]["name"]: c["chain"] for c in items if "chain" in c}
    assert chains["postrouting"]["type"] == "nat" and chains["postrouting"]["hook"] == "postrouting"
    assert chains["forward"]["hook"] == "forward"
    rules = [r["rule"] for r in items if "rule" in r]
    assert sum(any("masquerade" in e for e in r["expr"]) for r in rules) == 2
    nft.install_nat("mqvpn_nat", "10.9.0.0/24", tun_name="mqt0")  # replace: one transaction, old rules gone
    rules = [r["rule"] for r in nft_table("mqvpn_nat") if "rule" in r]
    assert sum(any("masquerade" in e for e in r["expr"]) for r in rules) == 1
    assert "10.9.0.0" in json.dumps(rules) and "10.8.0.0" not in json.dumps(rules)
    assert nft.delete_table("mqvpn_nat") is True
    assert nft.delete_table("mqvpn_nat") is False
    assert ("inet", "mqvpn_nat") not in nft_tables()


def test_kill_switch_table_installed_deleted(netns):
    nft.install_kill_switch("mqvpn_ks", tun_name="mqt0", servers=[("192.0.2.1", 443), ("2001:db8::1", 443)])
    chains = {c["chain"]["name"]: c["chain"] for c in nft_table("mqvpn_ks") if "chain" in c}
    assert {name: c["policy"] for name, c in chains.items()} == {"output": "drop", "input": "drop", "forward": "drop"}
    assert nft.list_tables() == [("inet", "mqvpn_ks")]
    assert nft.delete_table("mqvpn_ks") and nft.list_tables() == []


def test_other_tables_are_left_alone(netns):
    subprocess.run(["nft", "add", "table", "ip", "theirs"], check=True)
    nft.install_nat("mqvpn_nat", "10.8.0.0/24")
    nft.delete_table("mqvpn_nat")
    assert nft_tables() == {("ip", "theirs")}


def test_errors_carry_nft_stderr(netns):
    with pytest.raises(NftError) as info:
        nft.apply([{"add": {"chain": {"family": "inet", "table": "no_such_table", "name": "x"}}}])
    assert info.value.stderr and info.value.returncode != 0
    with pytest.raises(ValueError):
        nft.install_nat("t", None, None)
    with pytest.raises(ValueError):
        nft.install_kill_switch("t", tun_name="mqt0", servers=[])


def test_missing_nft_binary(netns, monkeypatch):
    monkeypatch.setattr(nft, "NFT", "/nonexistent/nft")
    with pytest.raises(NftError):
        nft.list_tables()


def test_no_string_reaches_a_command_line(netns):
    """A hostile name is data inside JSON, not syntax: stored as it is, nothing else happens."""
    subprocess.run(["nft", "add", "table", "ip", "theirs"], check=True)
    hostile = 'x"; flush ruleset; "'
    nft.install_kill_switch(hostile, tun_name="mqt0", servers=[("192.0.2.1", 1)])
    assert nft_tables() == {("ip", "theirs"), ("inet", hostile)}
    assert nft.delete_table(hostile) and nft_tables() == {("ip", "theirs")}
    tun = 'a" accept; drop'
    nft.install_kill_switch("mqvpn_ks", tun_name=tun, servers=[("192.0.2.1", 1)])
    rights = [
        e["match"]["right"] for r in nft_table("mqvpn_ks") if "rule" in r for e in r["rule"]["expr"] if "match" in e
    ]
    assert tun in rights
    nft.delete_table("mqvpn_ks")


# --- the kill switch at work ------------------------------------------------------------------------------------
@pytest.fixture
def two_hosts(netns, make_netns):
    """This namespace (client, mqc0 10.77.0.1 / fd00:77::1) <-> ``server`` (mqs0 10.77.0.2 / fd00:77::2)."""
    server = make_netns()
    link_pair("mqc0", "mqs0", server, ["10.77.0.1/24", "fd00:77::1/64"], ["10.77.0.2/24", "fd00:77::2/64"])
    return server


@needs_tun
def test_kill_switch_drops_all_but_the_tunnel(two_hosts):
    server = two_hosts
    with inside(server):
        tunnel4 = udp_socket(("10.77.0.2", 4433))
        other4 = udp_socket(("10.77.0.2", 5555))
        tunnel6 = udp_socket(("fd00:77::2", 4433))
    client4 = udp_socket(("10.77.0.1", 0))
    client6 = udp_socket(("fd00:77::1", 0))
    assert ping("10.77.0.2") and ping("fd00:77::2")  # before: everything flows

    nft.install_kill_switch("mqvpn_ks", tun_name="mqt0", servers=[("10.77.0.2", 4433), ("fd00:77::2", 4433)])
    try:
        assert not ping("10.77.0.2") and not ping("fd00:77::2")
        with inside(server):
            assert not ping("10.77.0.1")  # and nothing gets in either
        # the tunnel's own UDP, both ways, IPv4 and IPv6 (neighbour discovery allowed for the latter)
        client4.sendto(b"quic", ("10.77.0.2", 4433))
        data, addr = received(tunnel4)
        assert data == b"quic"
        tunnel4.sendto(b"back", addr)
        assert received(client4)[0] == b"back"
        client6.sendto(b"quic6", ("fd00:77::2", 4433))
        data, addr = received(tunnel6, 3.0)
        assert data == b"quic6"
        tunnel6.sendto(b"back6", addr)
        assert received(client6)[0] == b"back6"
        # any other UDP port on the same server is refused locally
        with pytest.raises(PermissionError):
            client4.sendto(b"leak", ("10.77.0.2", 5555))
        assert received(other4, 0.3) is None
        # a reply from a port other than the server's is dropped on the way in
        with inside(server):
            stray = udp_socket(("10.77.0.2", 6666))
        stray.sendto(b"stray", client4.getsockname())
        assert received(client4, 0.3) is None
        # loopback and the TUN are open
        lo = udp_socket(("127.0.0.1", 0))
        lo.sendto(b"self", lo.getsockname())
        assert received(lo)[0] == b"self"
        from mqvpn.linux.tun import Tun

        with Netlink() as nl, Tun.open("mqt0", netlink=nl) as tun:
            nl.add_address("mqt0", "10.9.0.1/24")
            client_tun = udp_socket(("10.9.0.1", 0))
            client_tun.sendto(b"into the tunnel", ("10.9.0.5", 53))
            deadline = time.monotonic() + 2
            seen = []
            while time.monotonic() < deadline and not any(p.endswith(b"into the tunnel") for p in seen):
                select.select([tun.fd], [], [], 0.1)
                seen += tun.read_batch()
            assert any(p.endswith(b"into the tunnel") for p in seen)
            client_tun.close()
        for sock in (lo, stray):
            sock.close()
    finally:
        nft.delete_table("mqvpn_ks")
    assert ping("10.77.0.2")  # removed: back to normal
    client4.sendto(b"free", ("10.77.0.2", 5555))
    assert received(other4)[0] == b"free"
    for sock in (tunnel4, other4, tunnel6, client4, client6):
        sock.close()


def test_kill_switch_allow_lan(two_hosts):
    nft.install_kill_switch("mqvpn_ks", tun_name="mqt0", servers=[("192.0.2.1", 443)], allow_lan=True)
    try:
        assert ping("10.77.0.2")  # RFC 1918
        assert ping("fd00:77::2")  # ULA
    finally:
        nft.delete_table("mqvpn_ks")


def test_reinstall_keeps_blocking(two_hosts):
    """Replacing the rules (new server address on reconnect) never opens a gap: one transaction."""
    nft.install_kill_switch("mqvpn_ks", tun_name="mqt0", servers=[("192.0.2.1", 443)])
    nft.install_kill_switch("mqvpn_ks", tun_name="mqt0", servers=[("192.0.2.2", 443)])
    try:
        assert not ping("10.77.0.2")
        assert "192.0.2.1" not in json.dumps(nft_table("mqvpn_ks"))
    finally:
        nft.delete_table("mqvpn_ks")


# --- NAT at work ------------------------------------------------------------------------------------------------
def test_nat_masquerades_the_client_subnet(netns, make_netns):
    """client (10.8.0.2) -> this namespace as the VPN server (mqs0 stands in for the TUN, ip_forward on)
    -> internet (10.77.0.9): the internet sees the server's address; without NAT, the client's."""
    client, internet = make_netns(), make_netns()
    link_pair("mqs0", "mqc0", client, ["10.8.0.1/24"], ["10.8.0.2/24"])
    link_pair("mqi0", "mqw0", internet, ["10.77.0.1/24"], ["10.77.0.9/24"])
    with inside(client), Netlink() as nl:
        nl.add_route("default", gateway="10.8.0.1")
    with inside(internet), Netlink() as nl:
        nl.add_route("10.8.0.0/24", gateway="10.77.0.1")  # so the un-NATed case gets through too
    with Netlink() as nl:
        nl.set_sysctl("net/ipv4/ip_forward", 1)
    with inside(internet):
        far = udp_socket(("10.77.0.9", 9000))
    with inside(client):
        near = udp_socket(("10.8.0.2", 0))

    near.sendto(b"plain", ("10.77.0.9", 9000))
    assert received(far)[1][0] == "10.8.0.2"
    nft.install_nat("mqvpn_nat", "10.8.0.0/24", tun_name="mqs0")
    with inside(client):
        fresh = udp_socket(("10.8.0.2", 0))  # a new flow: NAT is decided on a flow's first packet
    try:
        fresh.sendto(b"natted", ("10.77.0.9", 9000))
        data, addr = received(far)
        assert data == b"natted" and addr[0] == "10.77.0.1"
        far.sendto(b"reply", addr)  # conntrack takes it back to the client
        assert received(fresh)[0] == b"reply"
    finally:
        nft.delete_table("mqvpn_nat")
    for sock in (far, near, fresh):
        sock.close()

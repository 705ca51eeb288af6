"""The VPN end to end in network namespaces: real daemons (python -m mqvpn), real TUN, routes, NAT, DNS, kill switch.

Every test builds its own lab and tears it down; traffic only ever goes to addresses inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.e2e.vpnlab import KEY, VpnLab

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]


@pytest.fixture
def vpn(tmp_path):
    v = VpnLab(tmp_path)
    try:
        yield v
    finally:
        v.close()


def ping(v: VpnLab, role: str, dst: str, count: int = 3, *extra: str) -> subprocess.CompletedProcess:
    return v.run(role, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", *extra, dst, timeout=30)


def test_client_gets_address_routes_and_reaches_the_internet(vpn):
    lab = vpn.lab
    vpn.start_server()
    before = vpn.routes("cli")
    vpn.start_client()
    addr = vpn.wait_tunnel()
    assert addr == "10.99.0.2/32"
    routes = vpn.routes("cli")
    assert "0.0.0.0/1 dev mqvpn0 proto static scope link" in routes
    assert "128.0.0.0/1 dev mqvpn0 proto static scope link" in routes
    assert any(r.startswith(f"{lab.server_addr} via {lab.client_uplinks[0].gateway}") for r in routes)
    # the internet host is only reachable through the tunnel and the server's NAT
    res = ping(vpn, "cli", lab.inet_addr)
    assert res.returncode == 0, res.stdout + res.stderr + vpn.log("client.log")
    # the TUN MTU is the tunnel's datagram room: PMTUD found 1452-byte UDP payloads on this path
    vpn.wait_for(lambda: vpn.mtu("cli", "mqvpn0") == 1408, 5, "TUN MTU following the datagram room")
    assert "TUN mqvpn0 MTU 1408" in vpn.log("client.log")
    # TCP through the tunnel (bounded: 2 s)
    srv = subprocess.Popen(["ip", "netns", "exec", lab.nsname("inet"), "iperf3", "-s", "-1", "-p", "5201"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        res = vpn.run("cli", "iperf3", "-c", lab.inet_addr, "-p", "5201", "-t", "2", "-J", timeout=30)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr
        bps = json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]
        assert bps > 1e6  # it carried traffic; speed is measured by bench/, never asserted here
    finally:
        srv.kill()
        srv.wait()
    assert vpn.routes("cli") != before


def test_sigterm_restores_routes_and_resolv_conf(vpn):
    lab = vpn.lab
    # `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf: the client's own file
    etc = f"/etc/netns/{lab.nsname('cli')}"
    os.makedirs(etc, exist_ok=True)
    original = "# the client's own resolver\nnameserver 192.0.2.53\n"
    with open(f"{etc}/resolv.conf", "w") as f:
        f.write(original)
    try:
        vpn.start_server()
        routes_before = vpn.routes("cli")
        routes6_before = vpn.routes("cli", "-6")
        client = vpn.start_client("cli", "--dns", "172.16.0.53", "--dns", "172.16.0.54")
        vpn.wait_tunnel()
        vpn.wait_for(lambda: "172.16.0.53" in vpn.run("cli", "cat", "/etc/resolv.conf").stdout, 5, "DNS override")
        assert vpn.run("cli", "cat", "/etc/resolv.conf").stdout.count("nameserver") == 2
        assert vpn.stop(client, signal.SIGTERM) == 0
        assert vpn.run("cli", "cat", "/etc/resolv.conf").stdout == original
        assert vpn.routes("cli") == routes_before
        assert vpn.routes("cli", "-6") == routes6_before
        assert vpn.run("cli", "ip", "link", "show", "mqvpn0").returncode != 0  # the TUN is gone
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def test_sigkill_then_restart_restores(vpn):
    lab = vpn.lab
    etc = f"/etc/netns/{lab.nsname('cli')}"
    os.makedirs(etc, exist_ok=True)
    original = "nameserver 192.0.2.53\n"
    with open(f"{etc}/resolv.conf", "w") as f:
        f.write(original)
    try:
        vpn.start_server()
        routes_before = vpn.routes("cli")
        client = vpn.start_client("cli", "--dns", "172.16.0.53")
        vpn.wait_tunnel()
        vpn.wait_for(lambda: "172.16.0.53" in vpn.run("cli", "cat", "/etc/resolv.conf").stdout, 5, "DNS override")
        vpn.stop(client, signal.SIGKILL)  # no chance to clean up
        assert vpn.routes("cli") != routes_before
        # the next start undoes the leftovers first (then sets up its own tunnel again)
        client = vpn.start_client("cli", "--dns", "172.16.0.53", log="client2.log")
        vpn.wait_tunnel()
        assert "undid the leftovers" in vpn.log("client2.log") or "restored /etc/resolv.conf" in vpn.log("client2.log")
        assert vpn.stop(client, signal.SIGTERM) == 0
        assert vpn.routes("cli") == routes_before
        assert vpn.run("cli", "cat", "/etc/resolv.conf").stdout == original
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def test_wrong_key_exits_without_retrying(vpn):
    vpn.start_server()
    client = vpn.start_client("cli", key="not-the-key")
    code = client.wait(20)
    assert code != 0
    log = vpn.log("client.log")
    assert "403" in log and "not retrying" in log
    assert "reconnecting" not in log
    assert not vpn.addresses("cli", "mqvpn0")


def test_three_clients_distinct_addresses_reach_internet_and_each_other(vpn):
    lab = vpn.lab
    vpn.start_server()
    roles = ["cli", vpn.add_client_ns(1), vpn.add_client_ns(2)]
    for i, role in enumerate(roles):
        vpn.start_client(role, tun=f"mqc{i}", log=f"client{i}.log")
    addrs = [vpn.wait_tunnel(role, f"mqc{i}").split("/")[0] for i, role in enumerate(roles)]
    assert len(set(addrs)) == 3 and all(a.startswith("10.99.0.") for a in addrs)
    for role in roles:
        res = ping(vpn, role, lab.inet_addr, 2)
        assert res.returncode == 0, res.stdout + res.stderr
    # client to client through the server
    res = ping(vpn, roles[0], addrs[1], 2)
    assert res.returncode == 0, res.stdout + res.stderr
    res = ping(vpn, roles[2], addrs[0], 2)
    assert res.returncode == 0, res.stdout + res.stderr


def test_kill_switch_blocks_everything_but_the_tunnel_while_reconnecting(vpn):
    lab = vpn.lab
    server = vpn.start_server()
    client = vpn.start_client("cli", "--kill-switch")
    vpn.wait_tunnel()
    assert ping(vpn, "cli", lab.inet_addr, 3).returncode == 0
    up = lab.client_uplinks[0]
    cap = subprocess.Popen(["ip", "netns", "exec", lab.nsname("cli"), "tcpdump", "-n", "-l", "-Q", "out", "-i", up.dev,
                            "-c", "200", "not", "arp"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.5)
        vpn.stop(server, signal.SIGKILL)  # the server is gone: the client keeps trying
        vpn.wait_for(lambda: "reconnecting" in vpn.log("client.log") or "tunnel lost" in vpn.log("client.log"), 25,
                     "the client noticing (15 s of silence)")
        # traffic that would leak without the kill switch
        vpn.run("cli", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", lab.router_addr, timeout=10)
        direct = vpn.run("cli", "ping", "-n", "-c", "2", "-W", "1", lab.client_uplinks[0].gateway, timeout=10)
        assert direct.returncode != 0  # the uplink's own gateway is on-link: only the kill switch stops this
        time.sleep(1.0)
    finally:
        cap.terminate()
        out = cap.communicate(timeout=10)[0]
    lines = [line for line in out.splitlines() if " > " in line]
    leaks = [line for line in lines if not (f"> {lab.server_addr}.443" in line or f"{lab.server_addr}.443 >" in line)
             and "ICMP6" not in line and "ip6" not in line.lower()]
    assert not leaks, "\n".join(leaks[:20])
    assert vpn.stop(client, signal.SIGTERM) == 0
    # a clean exit removes the kill switch
    tables = vpn.run("cli", "nft", "-j", "list", "tables").stdout
    assert "mqvpn_ks" not in tables


def test_server_sigterm_closes_clients_and_restores_host(vpn):
    lab = vpn.lab
    server = vpn.start_server()
    vpn.start_client("cli", "--no-reconnect")
    vpn.wait_tunnel()
    tables_during = vpn.run("srv", "nft", "-j", "list", "tables").stdout
    assert "mqvpn_nat_mqvpn0" in tables_during
    assert vpn.stop(server, signal.SIGTERM) == 0
    assert "mqvpn_nat" not in vpn.run("srv", "nft", "-j", "list", "tables").stdout
    assert vpn.run("srv", "ip", "link", "show", "mqvpn0").returncode != 0
    # the client learns at once (CONNECTION_CLOSE) and, with --no-reconnect, exits
    vpn.wait_for(lambda: vpn.procs[-1].poll() is not None, 10, "client exit")


def test_ipv6_inside_the_tunnel(vpn):
    lab = vpn.lab
    vpn.start_server("--subnet6", "fd99::/112")
    vpn.start_client()
    vpn.wait_tunnel()
    vpn.wait_for(lambda: any(a.startswith("fd99::") for a in vpn.addresses("cli", "mqvpn0")), 10, "IPv6 address")
    assert "fd99::2/128" in vpn.addresses("cli", "mqvpn0")
    assert vpn.mtu("cli", "mqvpn0") >= 1280  # RFC 9484 §10.1: IPv6 needs a 1280-byte tunnel MTU
    vpn.wait_for(lambda: sum(r.startswith(("::/1 dev mqvpn0", "8000::/1 dev mqvpn0")) for r in vpn.routes("cli", "-6"))
                 == 2, 5, "IPv6 split routes")
    routes6 = vpn.routes("cli", "-6")
    assert any(r.startswith("::/1 dev mqvpn0") for r in routes6) and any(r.startswith("8000::/1 dev mqvpn0")
                                                                          for r in routes6)
    res = vpn.run("cli", "ping", "-6", "-n", "-c", "3", "-i", "0.2", "-W", "2", lab.inet_addr6, timeout=20)
    assert res.returncode == 0, res.stdout + res.stderr + vpn.log("client.log")


def test_no_nat_leaves_the_server_firewall_alone(vpn):
    vpn.start_server("--no-nat")
    vpn.start_client()
    vpn.wait_tunnel()
    assert "mqvpn_nat" not in vpn.run("srv", "nft", "-j", "list", "tables").stdout
    # without NAT the internet host has no route back to the client subnet: no reply (as the user asked)
    assert ping(vpn, "cli", vpn.lab.inet_addr, 2).returncode != 0


def test_no_manage_routes_leaves_routing_alone(vpn):
    vpn.start_server()
    before = vpn.routes("cli")
    vpn.start_client("cli", "--no-manage-routes")
    vpn.wait_tunnel(routes=False)
    time.sleep(0.5)
    assert vpn.routes("cli") == before  # nothing added: not even the server pin or the split routes


def test_ipv6_underlay(vpn):
    """Client and server talk QUIC over IPv6 (`--server [v6]:443`); the tunnel carries IPv4 as usual."""
    lab = vpn.lab
    vpn.start("srv", "--mode", "server", "--listen", f"[{lab.server_addr6}]:443", "--subnet", "10.99.0.0/24",
              "--cert", vpn.pki.cert, "--key", vpn.pki.key, "--auth-key", KEY, log="server.log")
    vpn.wait_for(lambda: "listening on" in vpn.log("server.log"), 10, "server up")
    vpn.start("cli", "--mode", "client", "--server", f"[{lab.server_addr6}]:443", "--auth-key", KEY, "--ca",
              vpn.pki.ca, "--tls-server-name", "localhost", log="client.log")
    assert vpn.wait_tunnel() == "10.99.0.2/32"
    assert any(r.startswith(lab.server_addr6) for r in vpn.routes("cli", "-6"))  # the server pinned via IPv6
    assert ping(vpn, "cli", lab.inet_addr).returncode == 0


def test_server_on_the_ipv6_wildcard_serves_ipv4_clients(vpn):
    lab = vpn.lab
    vpn.start("srv", "--mode", "server", "--listen", "[::]:443", "--subnet", "10.99.0.0/24",
              "--cert", vpn.pki.cert, "--key", vpn.pki.key, "--auth-key", KEY, log="server.log")
    vpn.wait_for(lambda: "listening on" in vpn.log("server.log"), 10, "server up")
    vpn.start_client()
    assert vpn.wait_tunnel() == "10.99.0.2/32"
    assert ping(vpn, "cli", lab.inet_addr).returncode == 0

"""`make demo`: the VPN working on this one machine, in network namespaces.

A client host with two uplinks, a router, the VPN server and an "internet" host are built as network namespaces
(tests/netns/lab.py). The internet host is reachable from the client only through the VPN (the server NATs, like a
real gateway). The demo starts `mqvpn` as a server and as a client with both uplinks (`--path ethA --path ethB`),
exactly as a user would on two machines, then shows the tunnel: address, routes, MTU, ping, TCP throughput over
both paths, and a failover (uplink A loses its carrier mid-transfer and comes back), and tears everything down.

Without root (no namespaces), it falls back to the QUIC transport demo over loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))


def say(text: str = "") -> None:
    print(text, flush=True)


def main() -> int:
    if os.geteuid() != 0:
        say("not root: network namespaces are not available, showing the QUIC transport demo instead\n")
        from mqvpn.demo import main as quic_demo

        return quic_demo()
    from tests.e2e.vpnlab import VpnLab

    say("mqvpn demo: a multipath VPN between network namespaces on this machine")
    say("  client ──(uplink A, 100 Mbit/s, 5 ms)──┐")
    say("         ──(uplink B,  40 Mbit/s, 15 ms)──┴ router ── server ──NAT── internet host\n")
    with tempfile.TemporaryDirectory() as tmp:
        vpn = VpnLab(Path(tmp), uplinks=2)
        lab = vpn.lab
        try:
            lab.shape("A", mbit=100, delay_ms=5)
            lab.shape("B", mbit=40, delay_ms=15)
            key = subprocess.run([sys.executable, "-m", "mqvpn", "--genkey"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            say(f"$ mqvpn --genkey                          -> {key[:8]}... (44 characters)")
            say(f"$ mqvpn --mode server --listen {lab.server_addr}:443 --subnet 10.99.0.0/24 --auth-key KEY ...")
            server = vpn.start_server(key=key)
            say(f"$ mqvpn --mode client --server {lab.server_addr}:443 --path ethA --path ethB --auth-key KEY ...")
            t0 = time.monotonic()
            client = vpn.start_client("cli", "--path", "ethA", "--path", "ethB", key=key)
            addr = vpn.wait_tunnel()
            say(f"\ntunnel up in {time.monotonic() - t0:.2f} s: client address {addr}")
            vpn.wait_for(lambda: "over ethB: up" in vpn.log("client.log"), 10, "path B")
            say("paths: 0 over ethA, 1 over ethB (multipath QUIC, draft-ietf-quic-multipath-21)")
            vpn.wait_for(lambda: (vpn.mtu("cli", "mqvpn0") or 0) > 1300, 5, "PMTUD")
            say(f"TUN mqvpn0 MTU {vpn.mtu('cli', 'mqvpn0')} (the QUIC datagram room after path MTU discovery)")
            for route in vpn.routes("cli"):
                if "mqvpn0" in route or lab.server_addr in route:
                    say(f"  route: {route}")

            ping = vpn.run("cli", "ping", "-n", "-c", "10", "-i", "0.1", lab.inet_addr, timeout=30)
            rtt = next((line for line in ping.stdout.splitlines() if line.startswith("rtt")), "no reply")
            say(f"\nping {lab.inet_addr} (internet host) through the tunnel: {rtt}")

            direct = _iperf(vpn, "srv", lab.server_addr, "client -> server directly over A (no tunnel)")
            before = _bytes(lab)
            tunnel = _iperf(vpn, "inet", lab.inet_addr, "client -> internet host through the VPN, 4 flows",
                            flows=4)
            after = _bytes(lab)
            share_b = _share(before, after)
            say(f"  bytes on the uplinks: A {100 - share_b:.0f} %, B {share_b:.0f} %")

            say("\nfailover: one TCP upload; uplink A loses its carrier at 2 s and is back at 4 s")
            rates = _failover(vpn)
            say("  Mbit/s per second: " + "  ".join(f"{r:.0f}" for r in rates))
            for line in vpn.log("client.log").splitlines():
                if "over ethA" in line and ("down" in line or ": up" in line or "validating" in line):
                    say("  client: " + line.split(" ", 2)[-1])
            reconnected = "reconnecting" in vpn.log("client.log")
            say("")
            say("summary")
            say(f"  tunnel: {addr} via {lab.server_addr}, MTU {vpn.mtu('cli', 'mqvpn0')}, paths over ethA and ethB")
            say(f"  TCP throughput: direct over A {direct:.0f} Mbit/s, through mqvpn over A+B {tunnel:.0f} Mbit/s "
                f"({share_b:.0f} % of it over B)")
            say(f"  failover: the transfer went on over B while A was down, "
                f"{'and the tunnel reconnected' if reconnected else 'without reconnecting'}")
            vpn.stop(client, signal.SIGTERM)
            vpn.stop(server, signal.SIGTERM)
            say("\nclient and server stopped (SIGTERM): routes, DNS, NAT and TUN devices restored")
        finally:
            vpn.close()
    say("namespaces removed. `make test` runs every test; see README.md.")
    return 0


def _bytes(lab) -> tuple[int, int]:
    return lab.path("A").stats()["up"]["rx_bytes"], lab.path("B").stats()["up"]["rx_bytes"]


def _share(before, after) -> float:
    a, b = after[0] - before[0], after[1] - before[1]
    return 100.0 * b / (a + b) if a + b else 0.0


def _failover(vpn) -> list[float]:
    lab = vpn.lab
    srv = subprocess.Popen(["ip", "netns", "exec", lab.nsname("inet"), "iperf3", "-s", "-1", "-p", "5203"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        cli = subprocess.Popen(["ip", "netns", "exec", lab.nsname("cli"), "iperf3", "-c", lab.inet_addr, "-p",
                                "5203", "-t", "7", "-J"], stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)
        lab.link_down("A")
        time.sleep(2.0)
        lab.link_up("A")
        out, _ = cli.communicate(timeout=30)
    finally:
        srv.kill()
        srv.wait()
    try:
        return [iv["sum"]["bits_per_second"] / 1e6 for iv in json.loads(out)["intervals"]]
    except (ValueError, KeyError):
        return []


def _iperf(vpn, server_role: str, addr: str, label: str, flows: int = 1) -> float:
    lab = vpn.lab
    srv = subprocess.Popen(["ip", "netns", "exec", lab.nsname(server_role), "iperf3", "-s", "-1", "-p", "5202"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        res = vpn.run("cli", "iperf3", "-c", addr, "-p", "5202", "-t", "3", "-P", str(flows), "-J", timeout=30)
        mbit = json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6 if res.returncode == 0 else 0.0
    finally:
        srv.kill()
        srv.wait()
    say(f"iperf3 TCP 3 s, {label}: {mbit:.1f} Mbit/s")
    return mbit


if __name__ == "__main__":
    raise SystemExit(main())

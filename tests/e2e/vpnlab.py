"""The VPN running for real in the namespace lab: server in ``srv``, clients in ``cli`` (and extra client
namespaces hanging off the router), the internet host ``inet`` behind the server's NAT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.interop.pki import make_test_pki
from tests.netns.lab import Lab

KEY = "e2e-test-key-0123456789abcdefghijklmnopqrstu="
SUBNET = "10.99.0.0/24"


class VpnLab:
    """A Lab plus a test PKI and helpers to start mqvpn daemons and inspect the namespaces."""

    def __init__(self, tmp: Path, uplinks: int = 1, shaped: bool = False) -> None:
        self.tmp = Path(tmp)
        self.pki = make_test_pki(self.tmp / "pki")
        self.lab = Lab(uplinks, shaped=shaped)
        self.extra: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for ns in self.extra:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.lab.close()

    # --- namespaces ----------------------------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        return role if role in self.extra else self.lab.nsname(role)

    def run(self, role: str, *cmd: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(role), *cmd], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def add_client_ns(self, i: int) -> str:
        """Another client host: a namespace with one link to the router (10.10.(20+i).2), no delay line."""
        ns = f"{self.lab.prefix}x{i}"
        rtr = self.lab.nsname("rtr")
        net = f"10.10.{20 + i}"
        for cmd in (["ip", "netns", "add", ns],
                    ["ip", "-n", rtr, "link", "add", f"x{i}", "type", "veth", "peer", "name", "eth0", "netns", ns],
                    ["ip", "-n", rtr, "addr", "add", f"{net}.1/24", "dev", f"x{i}"],
                    ["ip", "-n", rtr, "link", "set", f"x{i}", "up"],
                    ["ip", "-n", ns, "link", "set", "lo", "up"],
                    ["ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0"],
                    ["ip", "-n", ns, "link", "set", "eth0", "up"],
                    ["ip", "-n", ns, "route", "add", "default", "via", f"{net}.1"]):
            subprocess.run(cmd, check=True, capture_output=True)
        self.extra.append(ns)
        return ns

    # --- daemons -------------------------------------------------------------------------------------------------

    def start(self, role: str, *args: str, log: str) -> subprocess.Popen:
        from tests.netns.lab import VENV_PYTHON

        out = open(self.tmp / log, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", MQVPN_RUN_DIR=str(self.tmp / "run"))
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(role), str(VENV_PYTHON), "-m", "mqvpn", *args],
                             stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def start_server(self, *extra: str, key: str = KEY) -> subprocess.Popen:
        p = self.start("srv", "--mode", "server", "--listen", f"{self.lab.server_addr}:443", "--subnet", SUBNET,
                       "--cert", self.pki.cert, "--key", self.pki.key, "--auth-key", key, "--log-level", "debug",
                       *extra, log="server.log")
        self.wait_for(lambda: "listening on" in self.log("server.log"), 10, "server up")
        return p

    def start_client(self, role: str = "cli", *extra: str, key: str = KEY, tun: str = "mqvpn0",
                     log: str = "client.log") -> subprocess.Popen:
        return self.start(role, "--mode", "client", "--server", f"{self.lab.server_addr}:443", "--auth-key", key,
                          "--ca", self.pki.ca, "--tls-server-name", "localhost", "--tun-name", tun,
                          "--log-level", "debug", *extra, log=log)

    def log(self, name: str) -> str:
        try:
            return (self.tmp / name).read_text()
        except FileNotFoundError:
            return ""

    @staticmethod
    def wait_for(cond, timeout: float, what: str, interval: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(interval)

    def addresses(self, role: str, dev: str) -> list[str]:
        res = self.run(role, "ip", "-j", "addr", "show", "dev", dev)
        if res.returncode != 0:
            return []
        out = json.loads(res.stdout or "[]")
        return [f"{a['local']}/{a['prefixlen']}" for link in out for a in link.get("addr_info", [])
                if a.get("scope") == "global"]

    def mtu(self, role: str, dev: str) -> int | None:
        res = self.run(role, "ip", "-j", "link", "show", "dev", dev)
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)[0]["mtu"]

    def routes(self, role: str, family: str = "-4") -> list[str]:
        res = self.run(role, "ip", family, "route", "show")
        return sorted(line.strip() for line in res.stdout.splitlines() if line.strip())

    def wait_tunnel(self, role: str = "cli", dev: str = "mqvpn0", timeout: float = 15, routes: bool = True) -> str:
        """Wait until the client has its tunnel address (and, with managed routes, its routes via the TUN)."""
        self.wait_for(lambda: self.addresses(role, dev), timeout, f"tunnel address on {dev} in {role}")
        if routes:
            def split_routes() -> bool:
                current = self.routes(role)
                return all(any(r.startswith(f"{dst} dev {dev}") for r in current) for dst in ("0.0.0.0/1", "128.0.0.0/1"))

            self.wait_for(split_routes, 5, f"routes via {dev}")
        return self.addresses(role, dev)[0]

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if p.poll() is None:
            os.killpg(p.pid, sig) if sig == signal.SIGKILL else p.send_signal(sig)
        return p.wait(timeout)

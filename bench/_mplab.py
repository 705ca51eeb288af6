"""Shared helpers of the multipath benches (multipath_aggregation.py, failover_timeline.py).

They run the real mqvpn daemons in the namespace lab (tests/netns/lab.py, tests/e2e/vpnlab.py): client ``cli``
with uplinks A and B through userspace delay lines and tbf rate limits to the server ``srv``.  Traffic is iperf3
inside those namespaces only.  Everything is torn down on exit, on Ctrl-C and on SIGTERM/SIGHUP.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# (Mbit/s, one-way delay in ms) of uplinks A and B, both directions.
PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "full": {"A": (300.0, 10.0), "B": (80.0, 30.0)},
    "light": {"A": (100.0, 10.0), "B": (40.0, 30.0)},
}
IPERF_PORT = 5201
NAN = float("nan")


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else NAN


def fmt(v: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A plain text table; columns right-aligned unless ``right`` says otherwise."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    right = right or [True] * len(headers)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def preflight() -> None:
    """Exit with a message when the benches cannot run here."""
    from tests.netns.lab import unavailable

    why = unavailable()
    if why is None and shutil.which("iperf3") is None:
        why = "needs iperf3"
    if why:
        sys.exit(f"cannot run: {why}")


def host_info() -> dict:
    return {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C, so ``finally`` blocks tear the lab down."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class MpLab:
    """A VpnLab with two uplinks (A, B), shaped by profile, plus daemon and iperf3 helpers."""

    def __init__(self, keep_logs: str | None = None, log_level: str = "info") -> None:
        """``keep_logs``: a directory to copy every daemon log into (else they go with the temporary directory)."""
        from tests.e2e.vpnlab import VpnLab

        self.keep_logs = Path(keep_logs) if keep_logs else None
        self.log_level = log_level
        self.label = ""

        self._tmp = tempfile.TemporaryDirectory(prefix="mqvpn-bench-")
        self.tmp = Path(self._tmp.name)
        self.vpn = VpnLab(self.tmp, uplinks=2)
        self.lab = self.vpn.lab
        self.server = self.client = None
        self.tunnel_addr: str | None = None  # the server's address on its TUN
        self.client_log_offset = 0
        self._n = 0

    def close(self) -> None:
        try:
            self.vpn.close()
        finally:
            self._tmp.cleanup()

    # -- shaping and counters -----------------------------------------------------------------------------

    def apply_profile(self, name: str) -> None:
        for up, (mbit, delay) in PROFILES[name].items():
            self.lab.path(up).clear()  # no impairment left over
            self.lab.shape(up, mbit=mbit, delay_ms=delay)

    def counters(self, key: str = "tx_bytes") -> dict[str, dict[str, int]]:
        """Bytes forwarded by each path's delay line so far: {"A": {"up": n, "down": n}, "B": ...}; with
        ``key="rx_bytes"``, the bytes it received (sent into the path, including what it then dropped)."""
        return self.counters_both([key])[key]

    def counters_both(self, keys=("tx_bytes", "rx_bytes")) -> dict[str, dict[str, dict[str, int]]]:
        out: dict = {k: {} for k in keys}
        for up in ("A", "B"):
            st = self.lab.path(up).stats()
            for k in keys:
                out[k][up] = {d: int(st[d][k]) for d in ("up", "down")}
        return out

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
        return {p: {d: after[p][d] - before[p][d] for d in ("up", "down")} for p in before}

    # -- daemons ---------------------------------------------------------------------------------------------

    def start_vpn(self, scheduler: str, cc: str, *, label: str = "", timeout: float = 20) -> None:
        """Server and client (--path ethA --path ethB) with this scheduler and CC; waits for the tunnel and for
        both paths validated.  ``label`` names the kept logs."""
        self.stop_vpn()
        self._n += 1
        self.label = f"{self._n:02d}-{label or scheduler + '-' + cc}"
        extra = ("--scheduler", scheduler, "--cc", cc, "--log-level", self.log_level)
        self.server = self.vpn.start_server(*extra)
        self.client = self.vpn.start_client("cli", "--path", "ethA", "--path", "ethB", *extra,
                                            log=f"client-{self._n}.log")
        self.client_log = f"client-{self._n}.log"
        try:
            self.vpn.wait_tunnel(timeout=timeout)
            self.vpn.wait_for(lambda: "path 1 over ethB: up" in self.vpn.log(self.client_log), timeout,
                              "path B validated")
        except AssertionError as exc:
            raise RuntimeError(f"{exc}\n--- client log ---\n{self.vpn.log(self.client_log)[-3000:]}"
                               f"\n--- server log ---\n{self.vpn.log('server.log')[-2000:]}") from None
        addrs = self.vpn.addresses("srv", "mqvpn0")
        if not addrs:
            raise RuntimeError("the server's TUN mqvpn0 has no address")
        self.tunnel_addr = addrs[0].split("/")[0]

    def vpn_alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.server, self.client))

    def stop_vpn(self) -> None:
        for p in (self.client, self.server):  # client first: it restores its routes
            if p is None:
                continue
            try:
                self.vpn.stop(p, signal.SIGTERM, timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        if self.keep_logs and self.label:
            self.keep_logs.mkdir(parents=True, exist_ok=True)
            for src, kind in ((self.tmp / "server.log", "server"), (self.tmp / self.client_log, "client")):
                if src.exists():
                    shutil.copyfile(src, self.keep_logs / f"{self.label}-{kind}.log")
        self.server = self.client = None
        self.tunnel_addr = None
        self.label = ""

    # -- iperf3 ----------------------------------------------------------------------------------------------

    def iperf_server(self, bind: str, *args: str, port: int = IPERF_PORT, **popen) -> subprocess.Popen:
        """A one-off iperf3 server in srv bound to ``bind``; returns once it listens."""
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.DEVNULL)
        p = self.lab.popen("srv", "iperf3", "-s", "-1", "-B", bind, "-p", str(port), *args, **popen)
        deadline = time.monotonic() + 5
        while True:
            res = self.lab.run("srv", "ss", "-Hltn", f"sport = :{port}", check=False)
            if res.stdout.strip():
                return p
            if p.poll() is not None or time.monotonic() > deadline:
                kill(p)
                raise RuntimeError(f"iperf3 server on {bind}:{port} did not start")
            time.sleep(0.05)

    def iperf(self, dest: str, *, seconds: float, flows: int = 1, reverse: bool = False, omit: float = 0,
              client_args: Sequence[str] = (), bind: str | None = None) -> dict:
        """One iperf3 TCP test from cli to ``dest`` (an iperf3 server in srv bound to it). Returns
        {"mbps": receiver goodput, "sent_mbps", "retransmits", "error"} (mbps NaN on failure)."""
        server = self.iperf_server(dest)
        argv = ["iperf3", "-c", dest, "-p", str(IPERF_PORT), "-J", "-t", str(seconds), "-P", str(flows),
                "--connect-timeout", "5000", *client_args]
        if omit:
            argv += ["-O", str(omit)]
        if reverse:
            argv.append("-R")
        if bind:
            argv += ["-B", bind]
        out = {"mbps": NAN, "sent_mbps": NAN, "retransmits": None, "error": None}
        try:
            res = self.lab.run("cli", *argv, check=False, timeout=seconds + omit + 30)
            data = json.loads(res.stdout) if res.stdout.strip() else {}
            if data.get("error") or res.returncode:
                out["error"] = data.get("error") or f"iperf3 exited {res.returncode}: {res.stderr.strip()[:200]}"
            end = data.get("end", {})
            if "sum_received" in end:
                out["mbps"] = end["sum_received"]["bits_per_second"] / 1e6
                out["sent_mbps"] = end["sum_sent"]["bits_per_second"] / 1e6
                out["retransmits"] = end["sum_sent"].get("retransmits")
        except subprocess.TimeoutExpired:
            out["error"] = "iperf3 client timed out"
        except json.JSONDecodeError as exc:
            out["error"] = f"bad iperf3 JSON: {exc}"
        finally:
            kill(server)
        return out


class LinkCounters:
    """Bytes each uplink's rate limiter actually sent (tx_bytes of the router-side veths after the tbf: dX for
    client -> server, cX for server -> client), read by a small helper process in rtr on request (cheap enough
    to sample every 100 ms).  Unlike the delay line counters, they never exceed the link rate."""

    CODE = ("import sys\n"
            "for _ in sys.stdin:\n"
            "    print(' '.join(open(f'/sys/class/net/{d}/statistics/tx_bytes').read().strip() for d in sys.argv[1:]),"
            " flush=True)\n")

    def __init__(self, lab) -> None:
        self.devs = [(up.name, d, lab.uplink(up.name)) for up in lab.client_uplinks for d in ("up", "down")]
        names = [up.rtr_inner if d == "up" else up.rtr_port for _, d, up in self.devs]
        self.proc = lab.popen("rtr", sys.executable, "-c", self.CODE, *names, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)

    def read(self) -> dict[str, dict[str, int]]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        values = self.proc.stdout.readline().split()
        out: dict[str, dict[str, int]] = {}
        for (name, d, _), v in zip(self.devs, values, strict=True):
            out.setdefault(name, {})[d] = int(v)
        return out

    def close(self) -> None:
        kill(self.proc)


def kill(p: subprocess.Popen | None) -> None:
    """End a process started here (its whole session), politely first."""
    if p is None or p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\w+) (.*)$")


def log_events(text: str, patterns: Sequence[str]) -> list[tuple[float, str]]:
    """(wall-clock time, message) of the log lines matching any pattern (regular expressions)."""
    rx = re.compile("|".join(f"(?:{p})" for p in patterns))
    out = []
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if m and rx.search(m.group(3)):
            out.append((datetime.datetime.fromisoformat(m.group(1)).timestamp(), f"{m.group(2)} {m.group(3)}"))
    return out

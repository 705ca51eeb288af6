"""The namespace testbed: client, router, server and an "internet" host in network namespaces.

::

    cli                      rtr                                   srv                 inet
    ethA 10.10.1.2 ──veth── cA ═delay line A═ dA ──veth── rA 10.10.1.1
    ethB 10.10.2.2 ──veth── cB ═delay line B═ dB ──veth── rB 10.10.2.1
                                                   srv0 10.20.0.1 ──veth── rtr0 10.20.0.2
                                                                           inet0 172.16.0.1 ──veth── srv0 172.16.0.2

* IPv6 alike: fd00:10:<k>::/64 per uplink k, fd00:20::/64 rtr-srv, fd00:30::/64 srv-inet.
* cli: default route via uplink A (metric 100; B: 200, ...), and for every uplink a policy table
  (``from <uplink address> lookup 100+k``), so a socket bound to ethB (SO_BINDTODEVICE) or to ethB's
  address reaches the server through B.  Routes over a link without carrier are ignored
  (ignore_routes_with_linkdown), as a host whose DHCP client dropped them.
* rtr forwards between the uplinks and srv; it has no route to the internet side, so the client
  reaches inet only through the VPN.
* srv forwards, routes the client subnets back to rtr and everything else to inet.
* inet knows only its own subnet: the server must NAT what it forwards there (like the internet).

Each uplink's path goes through a userspace delay line (delayline.c) that bridges cX and dX at
layer 2: delay, jitter, loss, loss bursts, reordering, duplication, corruption and a blackhole,
changeable at run time through :meth:`Lab.path`.  Rate limits are tbf qdiscs on the router-side
egress after the delay line (dX for "up", cX for "down"), never on the client's own interface;
their queue (``limit_pkts``) is the bottleneck buffer.  Offloads are off on the path so every frame
is wire-sized with a complete checksum (UDP GSO of a sender is segmented before the path).

Neighbour entries across the delay line are static, so a blackhole or loss never breaks ARP/ND.
The delay lines run with real-time priority (the kernel processes the rest of the path inside
their send calls); veth peers get distinct interface indexes (else the kernel delays their carrier
events by up to a second).

Every Lab has its own name prefix (``mq<4 hex>-``) and a record under /run/mqvpn-testlab/ holding
the creating process; :func:`cleanup_stale` (called by every new Lab) removes only the namespaces
of records whose process is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tests.netns.delayline import DelayLine, PathImpairment, disable_offloads

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
RECORDS = Path("/run/mqvpn-testlab")
ROLES = ("cli", "rtr", "srv", "inet")
UPLINK_NAMES = "ABCD"

# The standard multipath profile of the issues: (Mbit/s, one-way delay in ms).
PROFILES: dict[str, tuple[float, float]] = {"A": (300.0, 10.0), "B": (80.0, 30.0)}

FRAME = 1514  # bytes of a full-size Ethernet frame, for byte limits
DELAYLINE_RT_PRIORITY = 10  # SCHED_FIFO priority of the delay line threads (0: normal)


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class Uplink:
    """One client uplink. ``index`` k is 1-based: addresses 10.10.k.0/24 and fd00:10:k::/64."""

    name: str  # "A", "B", ...
    index: int
    dev: str  # client interface, "ethA"
    addr: str  # client address
    addr6: str
    gateway: str  # router address on this uplink
    gateway6: str
    table: int  # client policy routing table for this uplink
    rtr_port: str  # router-side veth peer of dev (carrier, rate "down"), "cA"
    rtr_inner: str  # delay line's other side (rate "up"), "dA"
    rtr_dev: str  # router's IP interface of this uplink, "rA"
    prefixlen: int = 24
    prefixlen6: int = 64


def _mac(*octets: int) -> str:
    return ":".join(f"{o:02x}" for o in (0x02, 0x6D, 0x71, *octets))


# ---------------------------------------------------------------------------------------------
# records of live labs, and cleanup of dead runs' namespaces


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22: start time in clock ticks


def _alive(pid: int, start: str | None) -> bool:
    """Whether the process that wrote a record still runs (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and (start is None or fields[19] == start)


@contextlib.contextmanager
def _records_lock():
    RECORDS.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(RECORDS / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def list_namespaces() -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process inside ``ns``, then delete it."""
    for _ in range(3):
        res = subprocess.run(["ip", "netns", "pids", ns], check=False, capture_output=True, text=True, timeout=30)
        pids = [int(p) for p in res.stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


def cleanup_stale() -> list[str]:
    """Delete the namespaces of labs whose creating process is dead; returns their names.

    Only namespaces named by a record in /run/mqvpn-testlab/ are touched, and only when that
    record's process no longer exists, so concurrent runs never disturb each other."""
    removed: list[str] = []
    with _records_lock():
        existing = list_namespaces()
        for rec in RECORDS.glob("*.json"):
            try:
                info = json.loads(rec.read_text())
                pid, start, prefix = int(info["pid"]), info.get("start"), str(info["prefix"])
            except (OSError, ValueError, KeyError):
                continue
            if _alive(pid, start) or not prefix.startswith("mq"):
                continue
            for ns in existing:
                if ns.startswith(prefix):
                    _kill_namespace(ns)
                    removed.append(ns)
            rec.unlink(missing_ok=True)
    return removed


def _claim_prefix() -> tuple[str, Path]:
    with _records_lock():
        existing = list_namespaces()
        for _ in range(100):
            prefix = f"mq{secrets.token_hex(2)}-"
            if any(ns.startswith(prefix) for ns in existing):
                continue
            rec = RECORDS / f"{prefix[:-1]}.json"
            try:
                fd = os.open(rec, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "start": _start_time(os.getpid()), "prefix": prefix}, f)
            return prefix, rec
    raise LabError("no free lab prefix")


def namespace_inode(ns: str) -> tuple[int, int]:
    st = os.stat(f"/run/netns/{ns}")
    return st.st_dev, st.st_ino


def pids_in(inodes: set[tuple[int, int]]) -> list[int]:
    """Processes whose network namespace is one of ``inodes`` (see :func:`namespace_inode`)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            found.append(int(entry.name))
    return found


def unavailable() -> str | None:
    """Why the lab cannot run here (for pytest.skip), or None."""
    import shutil

    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "sysctl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2/procps)"
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "needs gcc for the delay line"
    return None


_LIVE: set[Lab] = set()


@atexit.register
def _close_all() -> None:
    for lab in list(_LIVE):
        with contextlib.suppress(Exception):
            lab.close()


# ---------------------------------------------------------------------------------------------


class Lab:
    """A fresh testbed; use as a context manager (or call :meth:`close`).

    ``uplinks``: number of client uplinks (1-4, named A, B, ...) or their names.
    ``shaped``: apply :data:`PROFILES` (A: 300 Mbit/s 10 ms, B: 80 Mbit/s 30 ms one way, both
    directions, 1000-packet bottleneck queue) to the uplinks that have one.
    """

    def __init__(self, uplinks: int | Sequence[str] = 1, *, shaped: bool = False, limit_pkts: int = 1000):
        if os.geteuid() != 0:
            raise LabError("the namespace lab needs root")
        names = UPLINK_NAMES[:uplinks] if isinstance(uplinks, int) else "".join(uplinks)
        if not names or any(n not in UPLINK_NAMES for n in names) or len(set(names)) != len(names):
            raise ValueError(f"uplinks must be 1-4 or names among {UPLINK_NAMES!r}")
        cleanup_stale()
        self.prefix, self._record = _claim_prefix()
        self.ns: dict[str, str] = {role: self.prefix + role for role in ROLES}
        self.client_uplinks: list[Uplink] = [
            Uplink(
                name=n,
                index=UPLINK_NAMES.index(n) + 1,
                dev=f"eth{n}",
                addr=f"10.10.{UPLINK_NAMES.index(n) + 1}.2",
                addr6=f"fd00:10:{UPLINK_NAMES.index(n) + 1}::2",
                gateway=f"10.10.{UPLINK_NAMES.index(n) + 1}.1",
                gateway6=f"fd00:10:{UPLINK_NAMES.index(n) + 1}::1",
                table=100 + UPLINK_NAMES.index(n) + 1,
                rtr_port=f"c{n}",
                rtr_inner=f"d{n}",
                rtr_dev=f"r{n}",
            )
            for n in names
        ]
        self.server_addr, self.server_addr6 = "10.20.0.2", "fd00:20::2"
        self.router_addr, self.router_addr6 = "10.20.0.1", "fd00:20::1"
        self.server_inet_addr, self.server_inet_addr6 = "172.16.0.1", "fd00:30::1"  # srv's NAT side
        self.inet_addr, self.inet_addr6 = "172.16.0.2", "fd00:30::2"
        self.server_dev, self.server_inet_dev, self.inet_dev = "rtr0", "inet0", "srv0"
        self._procs: list[subprocess.Popen] = []
        self._lines: dict[str, DelayLine] = {}
        self._paths: dict[str, PathImpairment] = {}
        self._inodes: set[tuple[int, int]] = set()
        self._closed = False
        _LIVE.add(self)
        try:
            self._build()
            if shaped:
                for up in self.client_uplinks:
                    if up.name in PROFILES:
                        mbit, delay = PROFILES[up.name]
                        self.shape(up.name, mbit=mbit, delay_ms=delay, limit_pkts=limit_pkts)
        except BaseException:
            self.close()
            raise

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Lab({self.prefix!r}, uplinks={[u.name for u in self.client_uplinks]})"

    # -- running things inside ----------------------------------------------------------------

    def nsname(self, ns: str) -> str:
        """Full namespace name of a role ("cli", "rtr", "srv", "inet"); full names pass through."""
        if ns in self.ns:
            return self.ns[ns]
        if ns in self.ns.values():
            return ns
        raise ValueError(f"unknown namespace {ns!r} (roles: {', '.join(ROLES)})")

    def exec_prefix(self, ns: str) -> list[str]:
        """The argv prefix running a command in ``ns``."""
        return ["ip", "netns", "exec", self.nsname(ns)]

    def run(
        self,
        ns: str,
        *cmd: str,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command in ``ns`` to completion (text output captured); killed after ``timeout``."""
        argv = self.exec_prefix(ns) + [str(c) for c in cmd]
        res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, input=input, env=env)
        if check and res.returncode != 0:
            raise LabError(
                f"{' '.join(argv)} exited {res.returncode}\nstdout: {res.stdout.strip()}\nstderr: {res.stderr.strip()}"
            )
        return res

    def popen(self, ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen:
        """Start a command in ``ns`` in the background (its own session, so its whole process group
        is ended at teardown). Keyword arguments go to subprocess.Popen."""
        kwargs.setdefault("start_new_session", True)
        p = subprocess.Popen(self.exec_prefix(ns) + [str(c) for c in cmd], **kwargs)
        self._procs.append(p)
        return p

    def python_argv(self, code_or_args: str | Sequence[str]) -> list[str]:
        exe = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
        if isinstance(code_or_args, str):
            return [exe, "-c", code_or_args]
        return [exe, *map(str, code_or_args)]

    @staticmethod
    def python_env(env: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def py(
        self,
        ns: str,
        code_or_args: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run the project's Python in ``ns``: a string is code (``-c``), a sequence is the argument
        list (``["-m", "mqvpn", ...]``). The repository root is on PYTHONPATH."""
        return self.run(
            ns, *self.python_argv(code_or_args), check=check, timeout=timeout, input=input, env=self.python_env(env)
        )

    def py_popen(self, ns: str, code_or_args: str | Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Like :meth:`py`, in the background (see :meth:`popen`)."""
        kwargs["env"] = self.python_env(kwargs.get("env"))
        return self.popen(ns, *self.python_argv(code_or_args), **kwargs)

    # -- topology -------------------------------------------------------------------------------

    def uplink(self, which: str | int | Uplink) -> Uplink:
        """An uplink by name ("A"), client device ("ethA"), 0-based position or itself."""
        if isinstance(which, Uplink):
            return which
        for i, up in enumerate(self.client_uplinks):
            if which in (up.name, up.dev, i):
                return up
        raise ValueError(f"no uplink {which!r} (have {[u.name for u in self.client_uplinks]})")

    def path(self, uplink: str | int | Uplink = "A") -> PathImpairment:
        """The impairment handle (delay line) of an uplink."""
        return self._paths[self.uplink(uplink).name]

    def set_rate(
        self,
        link: str | int | Uplink,
        direction: str = "both",
        mbit: float | None = None,
        *,
        limit_pkts: int = 1000,
        burst_bytes: int | None = None,
    ) -> None:
        """Rate-limit an uplink with tbf on the router side after the delay line ("up": dX egress,
        "down": cX egress). ``limit_pkts`` is the bottleneck queue (a pfifo under the tbf), full-size
        packets beyond it are tail-dropped. ``burst_bytes`` defaults to 1 ms of data (at least two
        frames). ``mbit=None`` removes the limit."""
        up = self.uplink(link)
        if direction not in ("up", "down", "both"):
            raise ValueError("direction must be up, down or both")
        devs = {"up": [up.rtr_inner], "down": [up.rtr_port], "both": [up.rtr_inner, up.rtr_port]}[direction]
        for dev in devs:
            if mbit is None:
                self.run("rtr", "tc", "qdisc", "del", "dev", dev, "root", check=False)
                continue
            burst = burst_bytes or max(2 * FRAME, int(mbit * 1e6 / 8 * 0.001))
            self.run(
                "rtr", "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf",
                "rate", f"{mbit}mbit", "burst", str(burst), "limit", str(limit_pkts * FRAME),
            )  # fmt: skip
            self.run(
                "rtr", "tc", "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:",
                "pfifo", "limit", str(limit_pkts),
            )  # fmt: skip

    def shape(
        self,
        link: str | int | Uplink,
        *,
        mbit: float | None,
        delay_ms: float,
        direction: str = "both",
        limit_pkts: int = 1000,
    ) -> None:
        """Rate and one-way delay of an uplink in one go."""
        self.set_rate(link, direction, mbit, limit_pkts=limit_pkts)
        self.path(link).set(direction, delay_ms=delay_ms)

    def link_down(self, uplink: str | int | Uplink) -> None:
        """Carrier loss on a client uplink: its router-side peer goes down, the client's interface
        stays administratively up with NO-CARRIER."""
        self.run("rtr", "ip", "link", "set", self.uplink(uplink).rtr_port, "down")

    def link_up(self, uplink: str | int | Uplink, *, wait: float = 5.0) -> None:
        """Carrier back; waits until the client sees it."""
        up = self.uplink(uplink)
        self.run("rtr", "ip", "link", "set", up.rtr_port, "up")
        deadline = time.monotonic() + wait
        while not self.carrier(up):
            if time.monotonic() > deadline:
                raise LabError(f"no carrier on {up.dev} after link_up")
            time.sleep(0.02)

    def carrier(self, uplink: str | int | Uplink) -> bool:
        """The client interface's /sys/class/net/<dev>/carrier."""
        res = self.run("cli", "cat", f"/sys/class/net/{self.uplink(uplink).dev}/carrier", check=False)
        return res.stdout.strip() == "1"

    # -- building and tearing down ------------------------------------------------------------

    def _ip(self, ns: str, lines: list[str], *, family: str | None = None) -> None:
        argv = ["ip", *([family] if family else []), "-n", self.nsname(ns), "-batch", "-"]
        res = subprocess.run(
            argv, check=False, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30
        )
        if res.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed: {res.stderr.strip()}\n" + "\n".join(lines))

    def _sysctl(self, ns: str, settings: dict[str, Any]) -> None:
        self.run(ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items()))

    def _build(self) -> None:
        res = subprocess.run(
            ["ip", "-batch", "-"],
            check=False,
            input="".join(f"netns add {name}\n" for name in self.ns.values()),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0:
            raise LabError(f"creating namespaces failed: {res.stderr.strip()}")
        self._inodes = {namespace_inode(name) for name in self.ns.values()}
        common = {
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
            "net.ipv6.conf.all.accept_dad": 0,
            "net.ipv6.conf.default.accept_dad": 0,
            "net.ipv6.conf.all.accept_ra": 0,
            "net.ipv6.conf.default.accept_ra": 0,
            "net.ipv6.conf.all.keep_addr_on_down": 1,
            "net.ipv6.conf.default.keep_addr_on_down": 1,
            # MLD reports all go out at link-up, before the delay lines run
            "net.ipv6.conf.all.mldv2_unsolicited_report_interval": 10,
            "net.ipv6.conf.default.mldv2_unsolicited_report_interval": 10,
            "net.ipv6.conf.all.mldv1_unsolicited_report_interval": 10,
            "net.ipv6.conf.default.mldv1_unsolicited_report_interval": 10,
        }
        forward = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
        self._sysctl("cli", common | {
            "net.ipv4.conf.all.ignore_routes_with_linkdown": 1,
            "net.ipv4.conf.default.ignore_routes_with_linkdown": 1,
            "net.ipv6.conf.all.ignore_routes_with_linkdown": 1,
            "net.ipv6.conf.default.ignore_routes_with_linkdown": 1,
        })  # fmt: skip
        self._sysctl("rtr", common | forward)
        self._sysctl("srv", common | forward)
        self._sysctl("inet", common)

        c = self.ns["cli"]
        links = []
        for up in self.client_uplinks:
            k = up.index
            # Interface indexes differ between veth peers: the kernel takes a veth whose index
            # equals its peer's for a non-veth and then delays its carrier events up to 1 s.
            links += [
                (
                    f"link add {up.rtr_port} index {20 + k} address {_mac(0x0C, k, 1)} type veth "
                    f"peer name {up.dev} index {10 + k} address {_mac(0x0A, k, 2)} netns {c}"
                ),
                (
                    f"link add {up.rtr_inner} index {30 + k} address {_mac(0x0C, k, 2)} type veth "
                    f"peer name {up.rtr_dev} index {40 + k} address {_mac(0x0A, k, 1)}"
                ),
            ]
        links.append(f"link add srv0 index 50 type veth peer name {self.server_dev} index 51 netns {self.ns['srv']}")
        self._ip("rtr", links)
        self._ip("srv", [
            f"link add {self.server_inet_dev} index 60 type veth peer name {self.inet_dev} index 61 netns {self.ns['inet']}"
        ])  # fmt: skip

        # the delay line's ports carry no IP of their own
        self._sysctl("rtr", {
            f"net.ipv6.conf.{d}.disable_ipv6": 1
            for up in self.client_uplinks for d in (up.rtr_port, up.rtr_inner)
        })  # fmt: skip
        disable_offloads(self.ns["cli"], *(up.dev for up in self.client_uplinks))
        disable_offloads(
            self.ns["rtr"], *(d for up in self.client_uplinks for d in (up.rtr_dev, up.rtr_port, up.rtr_inner))
        )

        cli, rtr, srv, inet = (["link set lo up"] for _ in range(4))
        cli6: list[str] = []
        for up in self.client_uplinks:
            k = up.index
            cli += [
                f"addr add {up.addr}/{up.prefixlen} dev {up.dev}",
                f"addr add {up.addr6}/{up.prefixlen6} dev {up.dev} nodad",
                f"link set {up.dev} up",
                f"neigh replace {up.gateway} lladdr {_mac(0x0A, k, 1)} dev {up.dev} nud permanent",
                f"neigh replace {up.gateway6} lladdr {_mac(0x0A, k, 1)} dev {up.dev} nud permanent",
                f"route add default via {up.gateway} dev {up.dev} metric {100 * k}",
                f"route add ::/0 via {up.gateway6} dev {up.dev} metric {100 * k}",
                f"route add default via {up.gateway} dev {up.dev} table {up.table}",
                f"route add ::/0 via {up.gateway6} dev {up.dev} table {up.table}",
                f"rule add from {up.addr} lookup {up.table} pref {1000 + k}",
            ]
            cli6 += [f"rule add from {up.addr6} lookup {up.table} pref {1000 + k}"]
            rtr += [
                f"link set {up.rtr_port} up",
                f"link set {up.rtr_inner} up",
                f"addr add {up.gateway}/{up.prefixlen} dev {up.rtr_dev}",
                f"addr add {up.gateway6}/{up.prefixlen6} dev {up.rtr_dev} nodad",
                f"link set {up.rtr_dev} up",
                f"neigh replace {up.addr} lladdr {_mac(0x0A, k, 2)} dev {up.rtr_dev} nud permanent",
                f"neigh replace {up.addr6} lladdr {_mac(0x0A, k, 2)} dev {up.rtr_dev} nud permanent",
            ]
        rtr += [
            f"addr add {self.router_addr}/24 dev srv0",
            f"addr add {self.router_addr6}/64 dev srv0 nodad",
            "link set srv0 up",
        ]
        srv += [
            f"addr add {self.server_addr}/24 dev {self.server_dev}",
            f"addr add {self.server_addr6}/64 dev {self.server_dev} nodad",
            f"link set {self.server_dev} up",
            f"addr add {self.server_inet_addr}/24 dev {self.server_inet_dev}",
            f"addr add {self.server_inet_addr6}/64 dev {self.server_inet_dev} nodad",
            f"link set {self.server_inet_dev} up",
            f"route add 10.10.0.0/16 via {self.router_addr} dev {self.server_dev}",
            f"route add fd00:10::/32 via {self.router_addr6} dev {self.server_dev}",
            f"route add default via {self.inet_addr} dev {self.server_inet_dev}",
            f"route add ::/0 via {self.inet_addr6} dev {self.server_inet_dev}",
        ]
        inet += [
            f"addr add {self.inet_addr}/24 dev {self.inet_dev}",
            f"addr add {self.inet_addr6}/64 dev {self.inet_dev} nodad",
            f"link set {self.inet_dev} up",
        ]
        self._ip("rtr", rtr)
        self._ip("cli", cli)
        self._ip("cli", cli6, family="-6")
        self._ip("srv", srv)
        self._ip("inet", inet)

        # Operational state up everywhere before the delay lines start: the MLD reports that
        # follow it are then over (report interval 10 ms) and never cross a delay line.
        self._wait_oper_up("cli", [up.dev for up in self.client_uplinks])
        self._wait_oper_up("rtr", [up.rtr_dev for up in self.client_uplinks] + ["srv0"])
        time.sleep(0.03)
        # The kernel processes what follows a frame the delay line sends (the router's
        # forwarding, the receiver's TCP...) inline in the delay line's thread; with real-time
        # priority that thread still gets its CPU back at once, so the delay stays precise under
        # load (measured: 0.1-0.4 ms mean lateness up to 250 Mbit/s on a 2-core VM).
        for up in self.client_uplinks:
            line = DelayLine(self.ns["rtr"], up.rtr_port, up.rtr_inner, rt_priority=DELAYLINE_RT_PRIORITY)
            self._lines[up.name] = line
            self._paths[up.name] = PathImpairment(up.name, line)
        for up in self.client_uplinks:
            self.link_up(up)  # carrier settles

    def _wait_oper_up(self, ns: str, devs: list[str], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            res = subprocess.run(
                ["ip", "-n", self.nsname(ns), "-br", "link"], check=False, capture_output=True, text=True, timeout=30
            )
            state = {line.split()[0].split("@")[0]: line.split()[1] for line in res.stdout.splitlines() if line.strip()}
            if all(state.get(d) == "UP" for d in devs):
                return
            if time.monotonic() > deadline:
                raise LabError(f"interfaces not up in {ns}: {state}")
            time.sleep(0.01)

    def helper_pids(self) -> list[int]:
        """PIDs of the delay line processes and of every process started with popen."""
        return [line.pid for line in self._lines.values()] + [p.pid for p in self._procs]

    def leftover_pids(self) -> list[int]:
        """Processes still inside this lab's namespaces (none after close())."""
        return pids_in(self._inodes)

    def close(self) -> None:
        """Tear everything down: processes started here, delay lines, namespaces, the record."""
        if self._closed:
            return
        self._closed = True
        try:
            for p in self._procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + 3
            for p in self._procs:
                try:
                    p.wait(timeout=max(0.05, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
            for p in self._procs:
                for f in (p.stdin, p.stdout, p.stderr):
                    with contextlib.suppress(OSError):
                        if f:
                            f.close()
            for line in self._lines.values():
                line.close()
            for ns in self.ns.values():
                if Path(f"/run/netns/{ns}").exists():
                    _kill_namespace(ns)
            self._record.unlink(missing_ok=True)
        finally:
            _LIVE.discard(self)


__all__ = [
    "PROFILES",
    "Lab",
    "LabError",
    "PathImpairment",
    "Uplink",
    "cleanup_stale",
    "list_namespaces",
    "pids_in",
    "unavailable",
]

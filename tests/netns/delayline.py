"""Build and drive the delay line (delayline.c), the link emulator of the namespace testbed.

The C helper is compiled with ``gcc -O2`` into a cache directory under /tmp named after the hash of
its source, so it is built once per source version and shared by concurrent test runs (the binary
is written under a temporary name and renamed into place).

One :class:`DelayLine` process serves one path and bridges two interfaces of the router namespace
(direction "up": IF_A -> IF_B, "down": IF_B -> IF_A).  It is driven through its stdin/stdout, and
exits when its stdin closes, so it never outlives the Python process that started it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("delayline.c")

DIRECTIONS = ("up", "down", "both")

# PathImpairment keyword -> delay line key
_KEYS = {
    "delay_ms": "delay",
    "jitter_ms": "jitter",
    "loss": "loss",
    "burst_p": "burst_p",
    "burst_len": "burst_len",
    "reorder": "reorder",
    "reorder_ms": "reorder_ms",
    "duplicate": "dup",
    "corrupt": "corrupt",
    "limit": "limit",
    "blackhole": "blackhole",
    "drop_next": "drop_next",
    "seed": "seed",
}

# What PathImpairment.clear() restores.
DEFAULTS: dict[str, Any] = {
    "delay_ms": 0,
    "jitter_ms": 0,
    "loss": 0,
    "burst_p": 0,
    "burst_len": 0,
    "reorder": 0,
    "reorder_ms": 0,
    "duplicate": 0,
    "corrupt": 0,
    "limit": 10000,
    "blackhole": False,
    "drop_next": 0,
}

_build_lock = threading.Lock()


class DelayLineError(RuntimeError):
    pass


def build() -> Path:
    """The compiled helper, built on first use (needs gcc)."""
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"mqvpn-delayline-{digest}"
    exe = cache / "delayline"
    with _build_lock:
        if exe.exists():
            return exe
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise DelayLineError("gcc is needed to build the delay line helper")
        cache.mkdir(mode=0o755, exist_ok=True)
        tmp = cache / f"delayline.{os.getpid()}.{threading.get_ident()}.tmp"
        res = subprocess.run(
            [gcc, "-O2", "-Wall", "-pthread", "-o", str(tmp), str(SOURCE)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise DelayLineError(f"building the delay line failed:\n{res.stderr}")
        os.replace(tmp, exe)
        return exe


def disable_offloads(ns: str, *ifnames: str) -> None:
    """Turn checksum/segmentation/GRO offloads off on interfaces of namespace ``ns``."""
    res = subprocess.run(
        ["ip", "netns", "exec", ns, str(build()), "offload", *ifnames],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        raise DelayLineError(f"disabling offloads on {ifnames} in {ns} failed: {res.stderr.strip()}")


def _format(direction: str, params: dict[str, Any]) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    parts = ["set", direction]
    for name, value in params.items():
        if value is None:
            continue
        if name not in _KEYS:
            raise TypeError(f"unknown impairment {name!r} (known: {', '.join(_KEYS)})")
        if isinstance(value, bool):
            value = int(value)
        parts.append(f"{_KEYS[name]}={value}")
    return " ".join(parts)


class DelayLine:
    """One delay line process in namespace ``ns`` bridging ``if_a`` (client side) and ``if_b``."""

    def __init__(
        self,
        ns: str,
        if_a: str,
        if_b: str,
        *,
        poll_us: int = 500,
        window_us: int = 200,
        rt_priority: int = 0,
    ):
        self.ns, self.if_a, self.if_b = ns, if_a, if_b
        self._lock = threading.Lock()
        argv = [str(build()), "run", if_a, if_b, f"--poll-us={poll_us}", f"--window-us={window_us}"]
        if rt_priority:
            argv.append(f"--rt={rt_priority}")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        first = self.proc.stdout.readline()
        if first.strip() != "ready":
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.close()
            raise DelayLineError(f"delay line {if_a}<->{if_b} in {ns} did not start: {first!r} {err}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, line: str) -> str:
        with self._lock:
            if self.proc.poll() is not None:
                raise DelayLineError(f"delay line {self.if_a}<->{self.if_b} exited ({self.proc.returncode})")
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline().strip()
        if reply.startswith("err"):
            raise DelayLineError(f"{line!r}: {reply}")
        if not reply:
            raise DelayLineError(f"delay line {self.if_a}<->{self.if_b}: no reply to {line!r}")
        return reply

    def set(self, direction: str = "both", **params: Any) -> None:
        self.command(_format(direction, params))

    def params(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.command("get"))

    def stats(self) -> dict[str, Any]:
        return json.loads(self.command("stats"))

    def reset_stats(self) -> None:
        self.command("reset")

    def close(self) -> None:
        p = self.proc
        if p.poll() is None:
            try:
                p.stdin.close()  # EOF: it exits by itself
            except OSError:
                pass
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for f in (p.stdin, p.stdout, p.stderr):
            try:
                if f:
                    f.close()
            except OSError:
                pass


class PathImpairment:
    """Impairments of one uplink, changeable at run time.

    Directions: "up" is client -> server, "down" server -> client, "both" sets the two alike.
    Probabilities are fractions (0.1 = 10 %), times milliseconds.

    delay_ms / jitter_ms   one-way delay, +- uniform jitter (jitter keeps packet order)
    loss                   independent random loss
    burst_p, burst_len     loss bursts: a burst starts with probability burst_p per packet and
                           lasts burst_len packets on average (geometric)
    reorder, reorder_ms    a packet is held reorder_ms longer with probability reorder, so later
                           packets overtake it
    duplicate              the packet is sent twice
    corrupt                one bit of the UDP/TCP/ICMP payload is flipped (checksum patched, so it is
                           delivered: QUIC sees an AEAD failure)
    limit                  packets the delay line holds at most (default 10000; the bottleneck queue
                           is the rate limiter's, see Lab.set_rate)
    blackhole              drop everything (the link stays up)
    drop_next              drop exactly the next N packets (a deterministic burst)
    seed                   reseed the random generator (shared by both directions)

    Loss, bursts, drop_next, reordering, duplication and corruption spare link-local control
    traffic (ARP, IGMP, MLD, multicast ND; counted as "control"), which is still delayed and
    blackholed.
    """

    def __init__(self, uplink: str, line: DelayLine):
        self.uplink = uplink
        self._line = line

    def set(self, direction: str = "both", **params: Any) -> PathImpairment:
        self._line.set(direction, **params)
        return self

    def clear(self, direction: str = "both") -> PathImpairment:
        """Back to a transparent path (no delay, no loss, no blackhole)."""
        return self.set(direction, **DEFAULTS)

    def blackhole(self, on: bool = True, direction: str = "both") -> PathImpairment:
        return self.set(direction, blackhole=on)

    def drop_next(self, count: int, direction: str = "up") -> PathImpairment:
        return self.set(direction, drop_next=count)

    def params(self) -> dict[str, dict[str, Any]]:
        return self._line.params()

    def stats(self) -> dict[str, Any]:
        """Counters per direction ("up", "down"): rx, tx, rx_bytes, tx_bytes, drop_loss, drop_burst,
        drop_blackhole, drop_next, drop_limit, drop_tx (the rate limiter's queue was full, or the
        link down), drop_trunc, dup, corrupt, reorder, control, oversize (frames larger than the
        MTU: offloads not off), qlen, qmax (frames held), late_sum_us / late_max_us (how late
        frames went out: late_sum_us / tx is the mean), wakeups, busy_us, loop_max_us,
        ts_fallback."""
        return self._line.stats()

    def reset_stats(self) -> None:
        self._line.reset_stats()

    @property
    def pid(self) -> int:
        return self._line.pid

    def __repr__(self) -> str:
        return f"PathImpairment({self.uplink!r}, pid={self.pid})"

"""Which path each DATAGRAM takes when a connection has several (draft-ietf-quic-multipath): ``minrtt``, ``wlb``
and ``backup``.

Every scheduler works with the same notion of a *usable* path, recomputed by ``refresh`` before each round of
sending (``datagrams_to_send``), never per packet:

* ACTIVE (validated), its MTU (DPLPMTUD) at least what the connection's DATAGRAM room assumes, not dead, no PTO outstanding, and no packet waiting for its acknowledgement longer than a
  PTO: a path that stopped answering gets no new data after one PTO (even while it is kept busy, which would
  keep pushing its PTO timer out), long before it is declared dead; its queue moves to the others;
* paths marked backup (PATH_STATUS_BACKUP, by either side) only when no available path is usable;
* when no path qualifies, the ACTIVE paths with the fewest PTOs (a single-path connection keeps sending).

Usable paths, lowest RTT first (minimum RTT once sampled), carry control frames and stream data (the connection sends on them in
that order).

DATAGRAMs wait in queues: one shared by the connection (``conn._datagrams``), drained by the usable paths in
order of their smoothed RTT, and one per path (``path.dgrams``), drained by that path only.

* ``minrtt``: everything in the shared queue: the lowest-RTT path with congestion window room takes the next one.
* ``backup``: ``minrtt``, and every path after the first is announced to the peer as a backup path, so both ends
  keep the extra paths idle until the first one fails.
* ``wlb`` (weighted load balancing, the default): a DATAGRAM goes into one path's queue when it is queued.
  TCP flows (``flow`` != 0: a hash of the inner 5-tuple, computed by the caller) are pinned to a path so that one
  flow is not reordered; new flows are spread in proportion to each path's capacity (weighted round robin over
  flow counts: the path minimising (flows + 1) / rate); about once a second pins move toward that proportion
  (at most a few flows per second: a path that comes back is used again at once, without reshuffling every flow),
  and while there are at least as many flows as paths every path carries one (else an unused path's capacity
  would never be measured),
  and pins on a path that is no longer usable move at the flow's next packet. Each path's queue holds at most
  100 ms of its rate (the inner TCPs see a router-sized buffer, not seconds of latency); a pinned flow whose
  path's queue is full (congestion-blocked) spills the packet to where it arrives first, without re-pinning,
  rather than losing it. Other packets (``flow == 0``) take the path where they would arrive first (queue wait +
  one-way delay): a ping stays on the fast path, bulk UDP spreads over all of them.

Capacity (``rate``) is the path's measured delivery rate (``Recovery.bandwidth``, a windowed maximum; before the
path was ever loaded, what its congestion window allows, cwnd / SRTT, if higher), and not below the highest rate seen in the last 10 s
(a path back from an outage starts with a collapsed window); one-way delay is SRTT / 2. Queued bytes are estimated
as packets x path MTU: enqueueing costs a dict lookup and a comparison for a pinned flow, a short loop over the
paths for the others.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from mqvpn.quic.path import PathState

if TYPE_CHECKING:  # pragma: no cover
    from mqvpn.quic.path import Path

SCHEDULERS = ("wlb", "minrtt", "backup")

QUEUE_MAX_DELAY = 0.1  # seconds of a path's rate its queue holds at most (wlb)
QUEUE_MIN_PACKETS = 256
BULK_PACKETS = 64  # a flow counts as load (placement, balancing) from its 64th packet: handshakes and control
# connections (iperf3's, ssh) do not push the next bulk flow off the best path
YOUNG_FLOW = 0.02  # seconds a new flow counts as load before it is busy (flows opened together: -P 16; not a
# control connection opened a few round trips before its data connection)
MOVE_GAIN = 1.2  # a pin moves only when the flow's share of capacity grows by this factor
REBALANCE_INTERVAL = 1.0  # seconds between pin maintenance rounds
PIN_IDLE = 30.0  # seconds without a packet after which a flow's pin is forgotten
FLOW_ACTIVE = 2.0  # a flow seen within this many seconds counts when balancing
CAPACITY_MEMORY = 10.0  # seconds a path's highest measured rate is remembered (outages, collapsed windows)
MAX_PINS = 65536  # beyond: the oldest pins are dropped at the next maintenance round


class Scheduler:
    """``minrtt``; the base of the others. ``conn`` is the QuicConnection (its ``_paths``, ``_datagrams``)."""

    name = "minrtt"

    def __init__(self, conn, queue_limit: int) -> None:
        self.conn = conn
        self.queue_limit = queue_limit
        self.usable: list[Path] = []  # lowest SRTT first

    # -- called once per round of sending ---------------------------------------------------------------------
    def refresh(self, now: float) -> list[Path]:
        """Recompute which paths are usable; returns them, lowest smoothed RTT first."""
        conn = self.conn
        client = conn.is_client
        active = []
        room_mtu = conn._room_mtu
        for p in conn._paths.values():
            p.usable = False
            # a path whose PMTU search has not reached the connection's DATAGRAM room yet waits for it
            if p.state == PathState.ACTIVE and (p.validated or client) and p.mtu >= room_mtu:
                active.append(p)
        healthy = [p for p in active if p.dead_since is None and p.recovery.pto_count == 0
                   and p.recovery.unanswered_for(now) <= p.recovery.pto_duration()]
        chosen = [p for p in healthy if not p.backup] or healthy
        if not chosen and active:
            fewest = min(p.recovery.pto_count for p in active)
            chosen = [p for p in active if p.recovery.pto_count == fewest and p.dead_since is None] or \
                [p for p in active if p.recovery.pto_count == fewest]
        if len(chosen) > 1:
            chosen.sort(key=_srtt)
        for p in chosen:
            p.usable = True
        self.usable = chosen
        self._prepare(now)
        # a path that lost its place hands its queue to the others
        for p in conn._paths.values():
            if not p.usable and p.dgrams:
                q = p.dgrams
                p.dgrams = type(q)()
                if chosen:
                    for data in q:
                        self.requeue(data)
                else:
                    conn.datagrams_dropped += len(q)
        return chosen

    def _prepare(self, now: float) -> None:
        """Per-round state of a scheduler, once ``usable`` is known."""

    # -- called per DATAGRAM ----------------------------------------------------------------------------------
    def enqueue(self, data: bytes, flow: int) -> bool:
        q = self.conn._datagrams
        if len(q) >= self.queue_limit:
            return False
        q.append(data)
        return True

    def requeue(self, data: bytes) -> None:
        """A DATAGRAM whose path stopped being usable (no flow: it may go anywhere)."""
        q = self.conn._datagrams
        if len(q) < self.queue_limit:
            q.append(data)
        else:
            self.conn.datagrams_dropped += 1

    def queued(self) -> int:
        return len(self.conn._datagrams) + sum(len(p.dgrams) for p in self.conn._paths.values())

    def on_path_opened(self, path: Path) -> None:
        """A new path exists (the ``backup`` scheduler marks it)."""

    def inherit(self, old_path_id: int, new_path_id: int) -> None:
        """``new_path_id`` runs over the same link as ``old_path_id`` did (the client reopened an interface):
        it starts with what was learnt about that link."""


class BackupScheduler(Scheduler):
    """``minrtt`` over the first path; every later path is announced as a backup (PATH_STATUS_BACKUP)."""

    name = "backup"

    def on_path_opened(self, path: Path) -> None:
        if path.path_id != 0:
            self.conn.set_path_status(path.path_id, available=False)


class WlbScheduler(Scheduler):
    """Weighted load balancing with TCP flow pinning (see the module docstring)."""

    name = "wlb"

    def __init__(self, conn, queue_limit: int) -> None:
        super().__init__(conn, queue_limit)
        # flow hash -> [path_id, last packet time, packets this round, packets in all]
        self.pins: dict[int, list] = {}
        # path_id -> busy pinned flows (BULK_PACKETS and more; as of the last maintenance + those since)
        self.flows: dict[int, int] = {}
        self.young: deque[tuple[float, int]] = deque()  # (time, path_id) of flows pinned lately
        # per usable path: [path, queue, seconds per byte, one-way delay, queue cap (packets)]
        self.entries: list[list] = []
        self.by_id: dict[int, list] = {}
        self.next_maintenance = 0.0
        self.mtu = 1200
        self.capacity: dict[int, list] = {}  # path_id -> [highest measured rate lately, when, True]
        self.spills = 0  # stats
        self.moves = 0

    def inherit(self, old_path_id: int, new_path_id: int) -> None:
        known = self.capacity.get(old_path_id)
        if known is not None and new_path_id not in self.capacity:
            self.capacity[new_path_id] = list(known)

    def _prepare(self, now: float) -> None:
        chosen = self.usable
        entries = []
        capacity = self.capacity
        unmeasured = []
        for p in chosen:
            rec = p.recovery
            srtt = rec.rtt.smoothed_rtt
            if rec.bandwidth_measured:
                rate = rec.bandwidth  # a window says what may be in flight, not what arrives (BBR keeps 2 BDP)
            else:
                rate = rec.cc.congestion_window / srtt if srtt > 0 else 0.0
                if rec.bandwidth > rate:
                    rate = rec.bandwidth
            # remembered for CAPACITY_MEMORY: a path back from an outage (its window collapsed, its estimate
            # restarted from a probe) keeps its weight and gets its flows back
            known = capacity.get(p.path_id)
            if not rec.bandwidth_measured and (known is None or not known[2]):
                pass  # nothing measured on this link yet: ranked below
            elif known is None or not known[2] or rate >= known[0] or now - known[1] > CAPACITY_MEMORY:
                capacity[p.path_id] = [rate, now, True]
            else:
                rate = known[0]
            if rate < 1000.0:
                rate = 1000.0
            if not rec.bandwidth_measured and (known is None or not known[2]):
                unmeasured.append(len(entries))
            # the path's queue holds at most QUEUE_MAX_DELAY of its rate: beyond, packets are dropped as a
            # router would (the inner TCPs back off) instead of piling up latency
            cap = int(rate * QUEUE_MAX_DELAY / p.mtu)
            cap = min(max(cap, QUEUE_MIN_PACKETS), self.queue_limit)
            entries.append([p, p.dgrams, 1.0 / rate, srtt / 2.0, cap])
        if unmeasured:
            # a path that was never loaded has shown only what it was given: rank it as good as the best loaded
            # one (new flows go there too, which measures it), or, with none loaded, all alike; ties go to the
            # lower RTT
            best = min(e[2] for i, e in enumerate(entries) if i not in unmeasured or len(unmeasured) == len(entries))
            for i in unmeasured:
                if entries[i][2] > best:
                    entries[i][2] = best
        self.entries = entries
        self.by_id = {e[0].path_id: e for e in entries}
        if chosen:
            self.mtu = min(p.mtu for p in chosen)
        if now >= self.next_maintenance:
            self.next_maintenance = now + REBALANCE_INTERVAL
            self._maintain(now)

    # -- per DATAGRAM -----------------------------------------------------------------------------------------
    def enqueue(self, data: bytes, flow: int) -> bool:
        entries = self.entries
        if not entries:
            return super().enqueue(data, flow)
        if flow:
            if flow < 0:  # the flow's FIN or RST: it still goes its way, but no longer counts as load
                flow = -flow
                self._ending(flow)
            pin = self.pins.get(flow)
            e = self.by_id.get(pin[0]) if pin is not None else None
            if e is None:
                e = self._pin(flow, pin)
            else:
                pin[1] = self.conn._now
                pin[2] += 1
                pin[3] += 1
                if pin[3] == BULK_PACKETS:  # from now on it counts as load on its path
                    self.flows[pin[0]] = self.flows.get(pin[0], 0) + 1
            q = e[1]
            if len(q) >= e[4]:
                # its path's queue is full: rather than drop, the packet spills to where it arrives first
                best = self._earliest()
                if best is not e:
                    self.spills += 1
                    e = best
                    q = e[1]
        else:
            e = self._earliest() if len(entries) > 1 else entries[0]
            q = e[1]
        if len(q) >= e[4]:
            return False
        q.append(data)
        return True

    def requeue(self, data: bytes) -> None:
        if not self.entries:
            super().requeue(data)
            return
        q = self._earliest()[1]
        if len(q) < self.queue_limit:
            q.append(data)
        else:
            self.conn.datagrams_dropped += 1

    def _earliest(self) -> list:
        mtu = self.mtu
        best = None
        best_t = 0.0
        for e in self.entries:
            t = len(e[1]) * mtu * e[2] + e[3]
            if best is None or t < best_t:
                best, best_t = e, t
        return best

    def _best_for_new_flow(self, exclude: int | None = None) -> list:
        flows = self.flows
        # flows pinned in the last YOUNG_FLOW seconds count as load already (flows starting together spread);
        # older ones only once they are busy (BULK_PACKETS)
        young = self.young
        now = self.conn._now
        while young and now - young[0][0] > YOUNG_FLOW:
            young.popleft()
        best = None
        best_score = 0.0
        for e in self.entries:
            pid = e[0].path_id
            if pid == exclude:
                continue
            n = flows.get(pid, 0)
            for _t, ypid in young:
                if ypid == pid:
                    n += 1
            score = (n + 1) * e[2]  # (flows + 1) / rate
            if best is None or score < best_score:
                best, best_score = e, score
        return best

    def _ending(self, flow: int) -> None:
        pin = self.pins.get(flow)
        if pin is not None and pin[3] >= 0:
            if pin[3] >= BULK_PACKETS and self.flows.get(pin[0], 0) > 0:
                self.flows[pin[0]] -= 1
            pin[3] = -(1 << 62)  # never counts as busy again

    def _pin(self, flow: int, pin: list | None) -> list:
        e = self._best_for_new_flow()
        pid = e[0].path_id
        if pin is None:
            self.pins[flow] = [pid, self.conn._now, 1, 1]
            if len(self.young) < 256:
                self.young.append((self.conn._now, pid))
        else:  # its path went away: move it
            if pin[3] >= BULK_PACKETS:
                old = pin[0]
                if self.flows.get(old, 0) > 0:
                    self.flows[old] -= 1
                self.flows[pid] = self.flows.get(pid, 0) + 1
            pin[0] = pid
            pin[1] = self.conn._now
            pin[2] += 1
        return e

    # -- about once a second ----------------------------------------------------------------------------------
    def _maintain(self, now: float) -> None:
        self._rebalance(now)
        for pin in self.pins.values():
            pin[2] = 0  # packets per maintenance round

    def _rebalance(self, now: float) -> None:
        pins = self.pins
        by_id = self.by_id
        for pid in [pid for pid, (_rate, t, _m) in self.capacity.items()
                    if pid not in self.conn._paths and now - t > CAPACITY_MEMORY]:
            del self.capacity[pid]
        stale = [f for f, pin in pins.items() if now - pin[1] > PIN_IDLE or pin[0] not in by_id]
        for f in stale:
            del pins[f]
        if len(pins) > MAX_PINS:
            for f, _pin in sorted(pins.items(), key=lambda kv: kv[1][1])[: len(pins) - MAX_PINS]:
                del pins[f]
        active: dict[int, list[int]] = {pid: [] for pid in by_id}
        for f, pin in pins.items():
            if now - pin[1] <= FLOW_ACTIVE and pin[3] >= BULK_PACKETS:
                active[pin[0]].append(f)
        self.flows = {pid: len(fs) for pid, fs in active.items()}
        if len(by_id) < 2:
            return
        total = sum(self.flows.values())
        if total == 0:
            return
        # the distribution new flows would get, one by one (weighted round robin over flow counts)
        target = {pid: 0 for pid in by_id}
        for _ in range(total):
            best = min(self.entries, key=lambda e: ((target[e[0].path_id] + 1) * e[2], e[3]))
            target[best[0].path_id] += 1
        # exploration: a path without flows has no measured capacity (its rate is what it was given), so while
        # there are at least as many flows as paths each path gets one: its capacity shows, the weights follow
        if total >= len(by_id):
            for pid in by_id:
                if target[pid] == 0:
                    donor = max(target, key=lambda q: target[q])
                    target[donor] -= 1
                    target[pid] = 1
        budget = max(1, total // 8)
        while budget:
            over = max(by_id, key=lambda pid: self.flows[pid] - target[pid])
            under = min(by_id, key=lambda pid: self.flows[pid] - target[pid])
            if self.flows[over] - target[over] <= 0 or self.flows[under] - target[under] >= 0:
                return
            # hysteresis: a flow moves only for a clearly better share (a move reorders it once), except to give an
            # unused path its first flow
            if self.flows[under] and (by_id[under][2] * (self.flows[under] + 1) * MOVE_GAIN
                                      > by_id[over][2] * self.flows[over]):
                return
            # the busiest flow balances best; a path's first flow (exploration) is the quietest one, so a bulk
            # transfer is not moved onto a path nobody measured yet
            candidates = active[over]
            pick = min if not self.flows[under] else max
            flow = pick(candidates, key=lambda f: pins[f][2])
            candidates.remove(flow)
            pins[flow][0] = under
            active[under].append(flow)
            self.flows[over] -= 1
            self.flows[under] += 1
            self.moves += 1
            budget -= 1


def _srtt(p: Path) -> float:
    """The order of paths (and of ties between them): minimum RTT once sampled. The smoothed RTT of a path that
    carries little (ACKs, keep-alives) is mostly ACK delay and old samples; its minimum is what the path is."""
    rtt = p.recovery.rtt
    return rtt.min_rtt if rtt.has_sample and rtt.min_rtt > 0 else rtt.smoothed_rtt


def create(name: str, conn, queue_limit: int) -> Scheduler:
    name = (name or "wlb").lower()
    if name == "wlb":
        return WlbScheduler(conn, queue_limit)
    if name == "minrtt":
        return Scheduler(conn, queue_limit)
    if name == "backup":
        return BackupScheduler(conn, queue_limit)
    raise ValueError(f"unknown scheduler {name!r} (available: {', '.join(SCHEDULERS)})")

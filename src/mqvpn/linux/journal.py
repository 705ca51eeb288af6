"""Everything mqvpn changes on the host, written down before it is done, so it can always be undone.

A journal is a file of JSON lines, one record per change, each fsync'ed before the change is made; a crash at
any instant leaves a journal that names every change that may have happened (and perhaps one that did not:
undoing tolerates that). ``undo_all`` reverts the records newest first and tolerates what is already gone; at
start-up ``ChangeJournal.recover`` undoes a crashed run's journal before anything new is done.

Records (``kind`` and fields; each also has ``seq``):
  route_added    dst, dev, gateway, table, metric   undo: delete that route
  address_added  dev, cidr                          undo: delete the address
  sysctl_set     path, previous                     undo: write ``previous`` back
  nft_table      name, family                       undo: delete our nftables table
  resolv_backup  path, backup                       undo: put the backup back as ``path`` (dns.restore_backup)
  resolvectl     link, command                      undo: ``<command> revert <link>`` (command: resolvectl)
  tun            name                               undo: delete the interface if it still exists
  cancel         ref                                record ``ref`` did not change anything (it was already so,
                                                    or the change failed): nothing to undo
The helpers ``add_route``, ``add_address`` and ``set_sysctl`` do record-then-change and cancel when the change
turns out not to be ours; use them rather than ``record`` + the Netlink call, so a route that was there before
us is never deleted by our undo.

A live journal is locked (flock); ``recover`` refuses a journal another running process holds.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import logging
import os

from mqvpn.linux import dns, nft
from mqvpn.linux.fsutil import fsync_dir
from mqvpn.linux.netlink import Netlink

__all__ = ["ChangeJournal", "JournalBusy", "journal_path", "RUN_DIR", "KINDS"]

RUN_DIR = "/run/mqvpn"


def run_dir() -> str:
    """Where journals and backups live: /run/mqvpn, or $MQVPN_RUN_DIR (tests give every run its own)."""
    return os.environ.get("MQVPN_RUN_DIR") or RUN_DIR

# kind -> (required fields, optional fields with their defaults)
KINDS: dict[str, tuple[tuple[str, ...], dict]] = {
    "route_added": (("dst",), {"dev": None, "gateway": None, "table": None, "metric": None}),
    "address_added": (("dev", "cidr"), {}),
    "sysctl_set": (("path", "previous"), {}),
    "nft_table": (("name",), {"family": "inet"}),
    "resolv_backup": (("path", "backup"), {}),
    "resolvectl": (("link",), {"command": dns.RESOLVECTL}),
    "tun": (("name",), {}),
}

_log = logging.getLogger(__name__)


class JournalBusy(Exception):
    """Another running process holds this journal (the same TUN name is in use)."""


def journal_path(tun_name: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"{tun_name}.journal")


class ChangeJournal:
    """The journal at ``path``; existing records (a crashed run's, if ``recover`` was not called) are kept and
    undone with the new ones. Raises ``JournalBusy`` when another process holds it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._entries: list[dict] = []
        self._seq = 0
        self._open()
        self._entries = _load(path)
        self._seq = max((e["seq"] for e in self._entries), default=0)

    def _open(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise JournalBusy(f"{self.path} is held by another running mqvpn") from exc
            raise
        self._fd = fd
        fsync_dir(directory)

    def close(self) -> None:
        """Release the journal (the file stays: what it records is still in place)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> ChangeJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def entries(self) -> list[dict]:
        """The records still to undo, oldest first (cancelled ones and their ``cancel`` left out)."""
        cancelled = {e["ref"] for e in self._entries if e["kind"] == "cancel"}
        return [e for e in self._entries if e["kind"] != "cancel" and e["seq"] not in cancelled]

    # --- writing ----------------------------------------------------------------------------------------------
    def record(self, kind: str, **fields) -> int:
        """Write one record (durably) and return its ``seq``; call it BEFORE making the change."""
        if kind not in KINDS:
            raise ValueError(f"unknown journal record kind {kind!r}")
        required, optional = KINDS[kind]
        missing = [f for f in required if f not in fields]
        unknown = [f for f in fields if f not in required and f not in optional]
        if missing or unknown:
            raise ValueError(f"{kind}: missing {missing}, unknown {unknown}")
        entry = {"seq": 0, "kind": kind, **optional, **fields}
        return self._append(entry)

    def cancel(self, seq: int) -> None:
        """Record ``seq`` changed nothing that is ours to undo."""
        self._append({"seq": 0, "kind": "cancel", "ref": seq})

    def _append(self, entry: dict) -> int:
        if self._fd < 0:
            self._open()
        self._seq += 1
        entry["seq"] = self._seq
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())
        os.fsync(self._fd)
        self._entries.append(entry)
        return self._seq

    # --- record, then change ------------------------------------------------------------------------------------
    def add_route(
        self,
        netlink: Netlink,
        dst: str,
        *,
        dev: str | None = None,
        gateway: str | None = None,
        metric: int | None = None,
        table: int | None = None,
    ) -> bool:
        """``netlink.add_route`` journalled; a route that was already there is not ours (False, no record)."""
        spec = {"dev": dev, "gateway": gateway, "metric": metric, "table": table}
        if netlink.has_route(dst, **spec):
            return False
        seq = self.record("route_added", dst=dst, **spec)
        try:
            added = netlink.add_route(dst, **spec)
        except Exception:
            self.cancel(seq)
            raise
        if not added:
            self.cancel(seq)
        return added

    def add_address(self, netlink: Netlink, dev: str, cidr: str) -> bool:
        """``netlink.add_address`` journalled; an address already there is not ours (False, no record)."""
        if _same_interface(cidr, netlink.addresses(dev)):
            return False
        seq = self.record("address_added", dev=dev, cidr=cidr)
        try:
            added = netlink.add_address(dev, cidr)
        except Exception:
            self.cancel(seq)
            raise
        if not added:
            self.cancel(seq)
        return added

    def set_sysctl(self, netlink: Netlink, path: str, value: str | int) -> str:
        """Set a /proc/sys value journalled (nothing recorded when it already has that value); returns the
        previous value."""
        previous = netlink.get_sysctl(path)
        if previous == str(value):
            return previous
        self.record("sysctl_set", path=path, previous=previous)
        netlink.set_sysctl(path, value)
        return previous

    # --- undoing ------------------------------------------------------------------------------------------------
    def undo_all(self, netlink: Netlink) -> list[str]:
        """Revert every record, newest first; returns what could not be undone (empty: all done).

        Afterwards the journal file is gone, or holds only the records that failed (the next start retries).
        """
        failures: list[tuple[dict, str]] = []
        for entry in reversed(self.entries):
            try:
                _UNDO[entry["kind"]](entry, netlink)
            except Exception as exc:  # keep going: undo as much as possible
                _log.warning("could not undo %s: %s", _describe(entry), exc)
                failures.append((entry, f"{_describe(entry)}: {exc}"))
        self._entries = [entry for entry, _ in reversed(failures)]
        if failures:
            self._rewrite()
        else:
            _unlink_quietly(self.path)
            fsync_dir(os.path.dirname(self.path) or ".")
            self.close()  # a later record starts a new file
        return [message for _, message in failures]

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for entry in self._entries:
                f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # our lock is on the old inode: take it on the new one
        self.close()
        self._open()

    @classmethod
    def recover(cls, path: str, netlink: Netlink) -> int:
        """Start-up: undo a journal left by a run that did not exit cleanly; returns how many records it had
        (0: none, nothing done). Raises ``JournalBusy`` when that run is still alive."""
        if not os.path.exists(path):
            return 0
        journal = cls(path)
        try:
            count = len(journal.entries)
            failures = journal.undo_all(netlink)
        finally:
            journal.close()
        for message in failures:
            _log.error("left over from a previous run, could not undo: %s", message)
        return count


# --- the undo of each kind ------------------------------------------------------------------------------------------
def _undo_route(entry: dict, nl: Netlink) -> None:
    nl.del_route(entry["dst"], dev=entry["dev"], gateway=entry["gateway"], metric=entry["metric"], table=entry["table"])


def _undo_address(entry: dict, nl: Netlink) -> None:
    nl.del_address(entry["dev"], entry["cidr"])


def _undo_sysctl(entry: dict, nl: Netlink) -> None:
    try:
        nl.set_sysctl(entry["path"], entry["previous"])
    except FileNotFoundError:  # a per-interface setting whose interface is gone
        pass


def _undo_nft_table(entry: dict, nl: Netlink) -> None:
    nft.delete_table(entry["name"], entry["family"])


def _undo_resolv_backup(entry: dict, nl: Netlink) -> None:
    dns.restore_backup(entry["path"], entry["backup"])


def _undo_resolvectl(entry: dict, nl: Netlink) -> None:
    dns.resolvectl_revert(entry["link"], entry["command"])  # fails when the link is gone, and so are its settings


def _undo_tun(entry: dict, nl: Netlink) -> None:
    nl.del_link(entry["name"])


_UNDO = {
    "route_added": _undo_route,
    "address_added": _undo_address,
    "sysctl_set": _undo_sysctl,
    "nft_table": _undo_nft_table,
    "resolv_backup": _undo_resolv_backup,
    "resolvectl": _undo_resolvectl,
    "tun": _undo_tun,
}


# --- helpers --------------------------------------------------------------------------------------------------------
def _load(path: str) -> list[dict]:
    """The records in ``path``; a torn last line (a crash mid-write) and unknown kinds are skipped."""
    entries = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return entries
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry.get("seq"), int) or (entry.get("kind") not in KINDS and entry["kind"] != "cancel"):
                raise ValueError("not a journal record")
        except (ValueError, KeyError, AttributeError) as exc:
            _log.warning("%s:%d: skipped (%s)", path, number, exc)
            continue
        if entry["kind"] != "cancel":
            entry = {**KINDS[entry["kind"]][1], **entry}
        entries.append(entry)
    return entries


def _same_interface(cidr: str, present: list[str]) -> bool:
    wanted = ipaddress.ip_interface(cidr)
    return any(ipaddress.ip_interface(p) == wanted for p in present)


def _describe(entry: dict) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("seq", "kind") and v is not None)
    return f"{entry['kind']}({fields})"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

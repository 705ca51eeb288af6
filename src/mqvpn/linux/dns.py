"""DNS through the tunnel (--dns): systemd-resolved per-link settings, or a replaced /etc/resolv.conf.

With systemd-resolved in charge of resolv.conf (it is a link into /run/systemd/resolve/, or it names the stub
127.0.0.53 and ``resolvectl status`` works) the servers go on the TUN link: ``resolvectl dns <tun> ...`` and
``resolvectl domain <tun> ~.`` (the routing-only root domain: every query goes to the TUN's servers); they
vanish with the link and are reverted explicitly on exit.

Otherwise resolv.conf is backed up and replaced by ``nameserver`` lines. The backup is a faithful copy: a regular
file keeps its bytes, mode and owner; a symlink (resolvconf, a resolved that is not running) is backed up as a
symlink to the same target, and the link itself is replaced by a file and restored as a link. Every write is a
temporary file renamed into place, so resolv.conf and the backup are always whole; the backup exists exactly
while the override may be in place, so a backup found at start-up is a crashed run's and ``restore_stale`` puts
it back. (A bind-mounted resolv.conf, as in containers, cannot be renamed over: it is rewritten in place.)

glibc reads at most 3 nameservers; resolved takes all 4.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import subprocess
import tempfile
from typing import Any

from mqvpn.linux.fsutil import fsync_dir

__all__ = [
    "DnsOverride",
    "DnsError",
    "MAX_SERVERS",
    "backup_path",
    "restore_backup",
    "resolved_active",
    "resolvectl_revert",
]

MAX_SERVERS = 4
RESOLVED_DIR = "/run/systemd/resolve/"
RESOLVED_STUBS = ("127.0.0.53", "127.0.0.54")
RESOLVECTL = "resolvectl"
TIMEOUT = 5.0


class DnsError(Exception):
    pass


def backup_path(resolv_conf: str, backup_dir: str, tun_name: str = "") -> str:
    """Where the original of ``resolv_conf`` is kept while overridden, per TUN name (one client per TUN name on a
    host; clients in other network namespaces may share /run but override their own resolv.conf)."""
    tag = f".{tun_name}" if tun_name else ""
    return os.path.join(backup_dir, os.path.basename(resolv_conf) + tag + ".mqvpn-backup")


class DnsOverride:
    """Point the host's DNS at ``servers`` (1..4 IP addresses) for as long as the tunnel is up.

    ``use_resolved``: None detects (see the module note), True/False forces a path. ``resolvectl`` is the
    command (a path in tests). ``journal`` (a ``ChangeJournal``) gets ``resolvectl`` / ``resolv_backup`` records
    before the change they describe. A context manager: ``restore`` on the way out, whatever happened.
    """

    def __init__(
        self,
        servers: list[str],
        tun_name: str,
        *,
        resolv_conf: str = "/etc/resolv.conf",
        backup_dir: str = "/run/mqvpn",
        resolvectl: str = RESOLVECTL,
        use_resolved: bool | None = None,
        journal: Any = None,
    ) -> None:
        if not 1 <= len(servers) <= MAX_SERVERS:
            raise ValueError(f"1 to {MAX_SERVERS} DNS servers, not {len(servers)}")
        self.servers = [str(ipaddress.ip_address(s)) for s in servers]
        self.tun_name = tun_name
        self.resolv_conf = resolv_conf
        self.backup_dir = backup_dir
        self.backup = backup_path(resolv_conf, backup_dir, tun_name)
        self.resolvectl = resolvectl
        self.use_resolved = use_resolved
        self.journal = journal
        self.mode: str | None = None  # "resolved" or "file" while applied

    def __enter__(self) -> DnsOverride:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def apply(self) -> str:
        """Override; returns the path taken, ``"resolved"`` or ``"file"``. On failure nothing stays changed."""
        if self.mode is not None:
            return self.mode
        resolved = self.use_resolved
        if resolved is None:
            resolved = resolved_active(self.resolv_conf, self.resolvectl)
        if resolved:
            self._apply_resolved()
            self.mode = "resolved"
        else:
            self._apply_file()
            self.mode = "file"
        return self.mode

    def restore(self) -> None:
        """Undo ``apply`` (idempotent). The file path puts the original back before the backup goes."""
        mode, self.mode = self.mode, None
        if mode == "resolved":
            resolvectl_revert(self.tun_name, self.resolvectl)
        elif mode == "file":
            restore_backup(self.resolv_conf, self.backup)

    @classmethod
    def restore_stale(cls, *, resolv_conf: str = "/etc/resolv.conf", backup_dir: str = "/run/mqvpn",
                      tun_name: str = "") -> bool:
        """Start-up: put back a backup a crashed run (with this TUN name) left; True when there was one."""
        return restore_backup(resolv_conf, backup_path(resolv_conf, backup_dir, tun_name))

    # --- the two paths ------------------------------------------------------------------------------------------
    def _apply_resolved(self) -> None:
        if self.journal is not None:
            self.journal.record("resolvectl", link=self.tun_name, command=self.resolvectl)
        try:
            _resolvectl(self.resolvectl, "dns", self.tun_name, *self.servers)
            _resolvectl(self.resolvectl, "domain", self.tun_name, "~.")
        except BaseException:
            resolvectl_revert(self.tun_name, self.resolvectl)
            raise
        try:  # older systemd lacks it; "~." alone already routes every query here
            _resolvectl(self.resolvectl, "default-route", self.tun_name, "true")
        except DnsError:
            pass

    def _apply_file(self) -> None:
        if os.path.lexists(self.backup):
            raise DnsError(
                f"{self.backup} exists: another run's backup of {self.resolv_conf}; restore_stale() it first"
            )
        if not os.path.lexists(self.resolv_conf):
            raise DnsError(f"{self.resolv_conf} does not exist: nothing to back up")
        os.makedirs(self.backup_dir, mode=0o700, exist_ok=True)
        if self.journal is not None:
            self.journal.record("resolv_backup", path=self.resolv_conf, backup=self.backup)
        _make_backup(self.resolv_conf, self.backup)
        try:
            st = os.stat(self.resolv_conf) if os.path.exists(self.resolv_conf) else None
            lines = [f"# mqvpn: DNS through {self.tun_name}; the original is restored on exit ({self.backup})"]
            lines += [f"nameserver {s}" for s in self.servers]
            _replace_file(
                self.resolv_conf,
                ("\n".join(lines) + "\n").encode(),
                mode=st.st_mode & 0o7777 if st else 0o644,
                owner=(st.st_uid, st.st_gid) if st else None,
            )
        except BaseException:
            restore_backup(self.resolv_conf, self.backup)
            raise


# --- resolvectl -----------------------------------------------------------------------------------------------------
def _resolvectl(command: str, *args: str) -> None:
    try:
        proc = subprocess.run([command, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DnsError(f"{command} {' '.join(args)}: {exc}") from exc
    if proc.returncode != 0:
        raise DnsError(f"{command} {' '.join(args)} failed: {proc.stderr.strip()}")


def resolvectl_revert(link: str, resolvectl: str = RESOLVECTL) -> bool:
    """Drop our per-link DNS settings; False when that failed (typically: the link is already gone)."""
    try:
        _resolvectl(resolvectl, "revert", link)
    except DnsError:
        return False
    return True


def resolved_active(resolv_conf: str = "/etc/resolv.conf", resolvectl: str = RESOLVECTL) -> bool:
    """True when systemd-resolved answers the host's queries, so per-link settings take effect."""
    if shutil.which(resolvectl) is None:
        return False
    if os.path.islink(resolv_conf):
        target = os.path.normpath(os.path.join(os.path.dirname(resolv_conf), os.readlink(resolv_conf)))
        if target.startswith(RESOLVED_DIR):
            return os.path.exists(target)  # /run is a tmpfs: the file exists only while resolved runs
    try:
        with open(resolv_conf) as f:
            servers = [line.split()[1] for line in f if line.startswith("nameserver") and len(line.split()) > 1]
    except OSError:
        return False
    if not servers or any(s not in RESOLVED_STUBS for s in servers):
        return False  # resolv.conf sends queries elsewhere: per-link settings would not be used by libc
    try:
        _resolvectl(resolvectl, "status")
    except DnsError:
        return False
    return True


# --- files ------------------------------------------------------------------------------------------------------
def _make_backup(resolv_conf: str, backup: str) -> None:
    """Copy ``resolv_conf`` (file: bytes, mode, owner; symlink: the link) to ``backup`` atomically."""
    directory = os.path.dirname(backup) or "."
    if os.path.islink(resolv_conf):
        tmp = _temp_name(directory, backup)
        os.symlink(os.readlink(resolv_conf), tmp)
        os.replace(tmp, backup)
    else:
        st = os.stat(resolv_conf)
        with open(resolv_conf, "rb") as f:
            data = f.read()
        _write_new(backup, data, st.st_mode & 0o7777, (st.st_uid, st.st_gid))
    fsync_dir(directory)


def restore_backup(resolv_conf: str, backup: str) -> bool:
    """Put ``backup`` back as ``resolv_conf``, then delete it; False when there is no backup."""
    if not os.path.lexists(backup):
        return False
    if os.path.islink(backup):
        directory = os.path.dirname(resolv_conf) or "."
        tmp = _temp_name(directory, resolv_conf)
        os.symlink(os.readlink(backup), tmp)
        try:
            os.replace(tmp, resolv_conf)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        fsync_dir(directory)
    else:
        st = os.stat(backup)
        with open(backup, "rb") as f:
            data = f.read()
        _replace_file(resolv_conf, data, mode=st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid))
    os.unlink(backup)
    fsync_dir(os.path.dirname(backup) or ".")
    return True


def _replace_file(path: str, data: bytes, *, mode: int, owner: tuple[int, int] | None) -> None:
    """Make ``path`` a regular file holding ``data``: a renamed temporary file (a symlink at ``path`` is
    replaced, not followed); in place when ``path`` is a mount point (EBUSY) or the directory is read-only."""
    directory = os.path.dirname(path) or "."
    try:
        _write_new(path, data, mode, owner)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        if os.path.islink(path):
            raise
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return
    fsync_dir(directory)


def _write_new(path: str, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _temp_name(directory: str, path: str) -> str:
    return os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

"""DnsOverride with temporary files: the resolv.conf path (file and symlink), stale backups, failures, and the
systemd-resolved path through a fake resolvectl that logs its arguments."""

from __future__ import annotations

import os
import stat

import pytest

from mqvpn.linux import dns
from mqvpn.linux.dns import DnsError, DnsOverride

ORIGINAL = "# the host's own\nsearch example.net\nnameserver 192.0.2.53\n"


@pytest.fixture
def resolv(tmp_path):
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir()
    path.write_text(ORIGINAL)
    os.chmod(path, 0o640)
    return path


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run" / "mqvpn"


def make_override(resolv, run_dir, servers=("10.8.0.1", "fd00:8::1"), **kw) -> DnsOverride:
    kw.setdefault("use_resolved", False)
    return DnsOverride(list(servers), "mqt0", resolv_conf=str(resolv), backup_dir=str(run_dir), **kw)


@pytest.fixture
def fake_resolvectl(tmp_path):
    """A resolvectl (``.path``) that appends its arguments to a log (``.calls()``) and fails for the link named
    "bad0" or when $FAKE_RESOLVECTL_FAIL names the subcommand."""
    log = tmp_path / "resolvectl.log"
    script = tmp_path / "bin" / "resolvectl"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'if [ "$2" = bad0 ] || [ "$1" = "$FAKE_RESOLVECTL_FAIL" ]; then echo "no such link" >&2; exit 1; fi\n'
        "exit 0\n"
    )
    script.chmod(0o755)

    class Fake:
        path = str(script)

        @staticmethod
        def calls() -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

    return Fake


# --- resolv.conf path -----------------------------------------------------------------------------------------
def test_file_override_and_restore(resolv, run_dir):
    override = make_override(resolv, run_dir)
    assert override.apply() == "file"
    text = resolv.read_text()
    assert "nameserver 10.8.0.1\nnameserver fd00:8::1\n" in text and "192.0.2.53" not in text
    assert stat.S_IMODE(os.stat(resolv).st_mode) == 0o640  # mode kept
    backup = run_dir / "resolv.conf.mqt0.mqvpn-backup"
    assert backup.read_text() == ORIGINAL and stat.S_IMODE(os.stat(backup).st_mode) == 0o640
    assert override.apply() == "file"  # a second apply is a no-op
    override.restore()
    assert resolv.read_text() == ORIGINAL
    assert stat.S_IMODE(os.stat(resolv).st_mode) == 0o640
    assert not backup.exists()
    override.restore()  # idempotent
    assert resolv.read_text() == ORIGINAL
    assert [p.name for p in resolv.parent.iterdir()] == ["resolv.conf"]  # no temporary files left


def test_symlinked_resolv_conf(resolv, run_dir, tmp_path):
    target = tmp_path / "resolvconf" / "resolv.conf"
    target.parent.mkdir()
    target.write_text(ORIGINAL)
    resolv.unlink()
    resolv.symlink_to("../resolvconf/resolv.conf")
    with make_override(resolv, run_dir) as override:
        override.apply()
        assert not resolv.is_symlink() and "10.8.0.1" in resolv.read_text()
        assert target.read_text() == ORIGINAL  # the link was replaced, not written through
        assert os.readlink(run_dir / "resolv.conf.mqt0.mqvpn-backup") == "../resolvconf/resolv.conf"
    assert resolv.is_symlink() and os.readlink(resolv) == "../resolvconf/resolv.conf"
    assert resolv.read_text() == ORIGINAL


def test_context_manager_restores_on_error(resolv, run_dir):
    with pytest.raises(RuntimeError), make_override(resolv, run_dir) as override:
        override.apply()
        raise RuntimeError("the tunnel died")
    assert resolv.read_text() == ORIGINAL


def test_stale_backup_restored_on_next_start(resolv, run_dir):
    make_override(resolv, run_dir).apply()  # ... and the process is gone without restore()
    assert "10.8.0.1" in resolv.read_text()
    with pytest.raises(DnsError):  # never take the override for the original
        make_override(resolv, run_dir).apply()
    assert DnsOverride.restore_stale(resolv_conf=str(resolv), backup_dir=str(run_dir), tun_name="mqt0") is True
    assert resolv.read_text() == ORIGINAL
    assert DnsOverride.restore_stale(resolv_conf=str(resolv), backup_dir=str(run_dir), tun_name="mqt0") is False
    make_override(resolv, run_dir).apply()  # usable again


def test_write_failure_puts_the_original_back(resolv, run_dir, monkeypatch):
    calls = []
    real = dns._replace_file

    def failing(path, data, **kw):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(dns, "_replace_file", failing)
    with pytest.raises(OSError):
        make_override(resolv, run_dir).apply()
    assert resolv.read_text() == ORIGINAL
    assert not (run_dir / "resolv.conf.mqt0.mqvpn-backup").exists()


def test_missing_resolv_conf(tmp_path, run_dir):
    with pytest.raises(DnsError):
        make_override(tmp_path / "nope.conf", run_dir).apply()


def test_server_list_is_checked(resolv, run_dir):
    with pytest.raises(ValueError):
        make_override(resolv, run_dir, servers=[])
    with pytest.raises(ValueError):
        make_override(resolv, run_dir, servers=["10.0.0.1"] * 5)
    with pytest.raises(ValueError):
        make_override(resolv, run_dir, servers=["not-an-address"])
    make_override(resolv, run_dir, servers=["10.0.0.1"] * 4)


# --- systemd-resolved path ----------------------------------------------------------------------------------------
def test_resolvectl_path(resolv, run_dir, fake_resolvectl):
    override = make_override(resolv, run_dir, use_resolved=True, resolvectl=fake_resolvectl.path)
    assert override.apply() == "resolved"
    assert fake_resolvectl.calls() == ["dns mqt0 10.8.0.1 fd00:8::1", "domain mqt0 ~.", "default-route mqt0 true"]
    assert resolv.read_text() == ORIGINAL and not run_dir.exists()  # the file path was not touched
    override.restore()
    assert fake_resolvectl.calls()[-1] == "revert mqt0"


def test_resolvectl_failure_reverts(resolv, run_dir, fake_resolvectl, monkeypatch):
    monkeypatch.setenv("FAKE_RESOLVECTL_FAIL", "domain")
    override = make_override(resolv, run_dir, use_resolved=True, resolvectl=fake_resolvectl.path)
    with pytest.raises(DnsError):
        override.apply()
    assert fake_resolvectl.calls() == ["dns mqt0 10.8.0.1 fd00:8::1", "domain mqt0 ~.", "revert mqt0"]


def test_old_resolvectl_without_default_route(resolv, run_dir, fake_resolvectl, monkeypatch):
    monkeypatch.setenv("FAKE_RESOLVECTL_FAIL", "default-route")
    override = make_override(resolv, run_dir, use_resolved=True, resolvectl=fake_resolvectl.path)
    assert override.apply() == "resolved"


def test_detection(resolv, run_dir, tmp_path, fake_resolvectl, monkeypatch):
    absent = str(tmp_path / "bin" / "no-resolvectl")
    # no resolvectl: the file path, whatever resolv.conf says
    resolv.write_text("nameserver 127.0.0.53\n")
    assert not dns.resolved_active(str(resolv), absent)
    assert make_override(resolv, run_dir, use_resolved=None, resolvectl=absent).apply() == "file"
    DnsOverride.restore_stale(resolv_conf=str(resolv), backup_dir=str(run_dir), tun_name="mqt0")
    # the stub in resolv.conf and `resolvectl status` works: resolved
    assert dns.resolved_active(str(resolv), fake_resolvectl.path)
    assert make_override(resolv, run_dir, use_resolved=None, resolvectl=fake_resolvectl.path).apply() == "resolved"
    # ... but `resolvectl status` fails (resolved not running): the file
    monkeypatch.setenv("FAKE_RESOLVECTL_FAIL", "status")
    assert not dns.resolved_active(str(resolv), fake_resolvectl.path)
    monkeypatch.delenv("FAKE_RESOLVECTL_FAIL")
    # resolv.conf names other servers: libc would not ask resolved, so the file
    resolv.write_text(ORIGINAL)
    assert not dns.resolved_active(str(resolv), fake_resolvectl.path)
    # a link into resolved's run directory that exists: resolved (no need to ask resolvectl)
    resolved_dir = tmp_path / "systemd" / "resolve"
    resolved_dir.mkdir(parents=True)
    monkeypatch.setattr(dns, "RESOLVED_DIR", str(resolved_dir) + "/")
    resolv.unlink()
    resolv.symlink_to(resolved_dir / "stub-resolv.conf")
    assert not dns.resolved_active(str(resolv), fake_resolvectl.path)  # dangling: resolved is not running
    (resolved_dir / "stub-resolv.conf").write_text("nameserver 127.0.0.53\n")
    monkeypatch.setenv("FAKE_RESOLVECTL_FAIL", "status")
    assert dns.resolved_active(str(resolv), fake_resolvectl.path)


def test_journal_records_resolvectl(resolv, run_dir, fake_resolvectl, tmp_path):
    from mqvpn.linux.journal import ChangeJournal

    journal = ChangeJournal(str(tmp_path / "j"))
    override = make_override(resolv, run_dir, use_resolved=True, resolvectl=fake_resolvectl.path, journal=journal)
    override.apply()
    assert journal.entries[0]["kind"] == "resolvectl" and journal.entries[0]["link"] == "mqt0"
    assert journal.undo_all(netlink=None) == []  # resolvectl undo needs no netlink
    assert fake_resolvectl.calls()[-1] == "revert mqt0"

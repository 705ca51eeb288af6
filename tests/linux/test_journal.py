"""ChangeJournal: record-before-change, exact undo of routes/addresses/sysctls/nft/DNS, crash recovery."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from mqvpn.linux import dns, nft
from mqvpn.linux.journal import ChangeJournal, JournalBusy, journal_path
from mqvpn.linux.netlink import Netlink, NetlinkError
from mqvpn.linux.tun import Tun
from tests.linux.conftest import needs_nft, needs_tun
from tests.linux.test_netlink import route_table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def nl(netns):
    with Netlink() as nl:
        yield nl


@pytest.fixture
def veth(nl):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("add", ifname="mqv0", kind="veth", peer="mqv1")
    nl.set_link("mqv0", up=True)
    nl.set_link("mqv1", up=True)
    nl.add_address("mqv0", "10.20.0.1/24")
    nl.add_route("default", gateway="10.20.0.254")
    return "mqv0"


def snapshot(nl: Netlink) -> tuple:
    return (
        route_table(nl, socket.AF_INET),
        route_table(nl, socket.AF_INET6),
        tuple(nl.addresses("mqv0")),
        nl.get_sysctl("net/ipv4/ip_forward"),
        nl.get_sysctl("net/ipv6/conf/all/forwarding"),
    )


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- pure file behaviour (no root) ----------------------------------------------------------------------------
def test_records_are_on_disk_before_the_change(tmp_path):
    path = str(tmp_path / "run" / "mqt0.journal")
    journal = ChangeJournal(path)
    seq = journal.record("route_added", dst="0.0.0.0/1", dev="mqt0")
    assert read_records(path) == [
        {
            "seq": seq,
            "kind": "route_added",
            "dst": "0.0.0.0/1",
            "dev": "mqt0",
            "gateway": None,
            "table": None,
            "metric": None,
        }
    ]
    journal.cancel(seq)
    assert journal.entries == []
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    journal.close()


def test_unknown_kinds_and_fields_are_refused(tmp_path):
    journal = ChangeJournal(str(tmp_path / "j"))
    with pytest.raises(ValueError):
        journal.record("dns", tun="mqt0")
    with pytest.raises(ValueError):
        journal.record("route_added", dev="mqt0")  # dst missing
    with pytest.raises(ValueError):
        journal.record("tun", name="mqt0", colour="red")
    journal.close()


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "j"
    path.write_text('{"seq":1,"kind":"tun","name":"mqt9"}\n{"seq":2,"kind":"sysctl_set","pa')
    journal = ChangeJournal(str(path))
    assert journal.entries == [{"seq": 1, "kind": "tun", "name": "mqt9"}]
    assert journal.record("tun", name="mqt8") == 2
    journal.close()


def test_second_holder_is_refused(tmp_path):
    path = str(tmp_path / "j")
    first = ChangeJournal(path)
    with pytest.raises(JournalBusy):
        ChangeJournal(path)
    first.close()
    ChangeJournal(path).close()


def test_journal_path():
    assert journal_path("mqvpn0") == "/run/mqvpn/mqvpn0.journal"


def test_recover_without_a_journal(tmp_path):
    assert ChangeJournal.recover(str(tmp_path / "none.journal"), netlink=None) == 0


# --- undo in a namespace ------------------------------------------------------------------------------------------
def test_undo_restores_routes_addresses_sysctls_exactly(tmp_path, nl, veth):
    before = snapshot(nl)
    path = str(tmp_path / "mqv0.journal")
    journal = ChangeJournal(path)
    assert journal.set_sysctl(nl, "net/ipv4/ip_forward", 1) == "0"
    assert journal.set_sysctl(nl, "net/ipv4/ip_forward", 1) == "1"  # no change, no record
    journal.set_sysctl(nl, "net/ipv6/conf/all/forwarding", 1)
    assert journal.add_address(nl, "mqv0", "10.21.0.1/24")
    assert journal.add_address(nl, "mqv0", "10.20.0.1/24") is False  # was there: not ours
    assert journal.add_route(nl, "192.0.2.50/32", dev="mqv0", gateway="10.20.0.254")
    assert journal.add_route(nl, "0.0.0.0/1", dev="mqv0")
    assert journal.add_route(nl, "128.0.0.0/1", dev="mqv0", metric=5)
    assert journal.add_route(nl, "::/1", dev="mqv0")
    assert journal.add_route(nl, "198.51.100.0/24", dev="mqv0", table=100)
    assert journal.add_route(nl, "default", gateway="10.20.0.254") is False  # was there
    assert [e["kind"] for e in journal.entries].count("route_added") == 5
    assert snapshot(nl) != before
    assert journal.undo_all(nl) == []
    assert snapshot(nl) == before
    assert route_table(nl, socket.AF_INET).count(None) == 0
    assert not os.path.exists(path)
    journal.close()


def test_a_failed_change_is_cancelled(tmp_path, nl, veth):
    journal = ChangeJournal(str(tmp_path / "j"))
    journal.add_route(nl, "192.0.2.7/32", gateway="10.20.0.254")
    with pytest.raises(NetlinkError):
        journal.add_route(nl, "192.0.2.7/32", gateway="10.20.0.253")  # conflict: the kernel says EEXIST
    assert len(journal.entries) == 1
    journal.undo_all(nl)


def test_undo_tolerates_what_is_already_gone(tmp_path, nl, veth):
    journal = ChangeJournal(str(tmp_path / "j"))
    journal.record("tun", name="mqt7")  # never created
    journal.record("route_added", dst="10.99.0.0/16", dev="mqt7")  # its device never existed
    journal.record("address_added", dev="mqt7", cidr="10.99.0.1/16")
    journal.record("sysctl_set", path="net/ipv6/conf/mqt7/disable_ipv6", previous="0")
    journal.record("resolv_backup", path=str(tmp_path / "resolv.conf"), backup=str(tmp_path / "missing"))
    journal.record("resolvectl", link="mqt7", command=str(tmp_path / "no-resolvectl"))
    journal.add_route(nl, "192.0.2.9/32", gateway="10.20.0.254")
    nl.del_route("192.0.2.9/32", gateway="10.20.0.254")  # someone else removed it
    assert journal.undo_all(nl) == []
    journal.close()


@needs_tun
def test_undo_persistent_tun(tmp_path, nl):
    journal = ChangeJournal(str(tmp_path / "j"))
    journal.record("tun", name="mqt3")
    Tun.open("mqt3", persist=True, netlink=nl).close()
    assert journal.add_address(nl, "mqt3", "10.30.0.1/24")
    journal.add_route(nl, "10.31.0.0/16", dev="mqt3")
    assert journal.undo_all(nl) == []
    assert nl.link_index("mqt3") is None


@needs_nft
def test_undo_nft_tables(tmp_path, nl):
    journal = ChangeJournal(str(tmp_path / "j"))
    journal.record("nft_table", name="mqvpn_nat_t", family="inet")
    nft.install_nat("mqvpn_nat_t", "10.8.0.0/24", tun_name="mqt0")
    journal.record("nft_table", name="mqvpn_ks_t")
    nft.install_kill_switch("mqvpn_ks_t", tun_name="mqt0", servers=[("192.0.2.1", 443)])
    assert nft.table_exists("mqvpn_nat_t") and nft.table_exists("mqvpn_ks_t")
    assert journal.undo_all(nl) == []
    assert not nft.table_exists("mqvpn_nat_t") and not nft.table_exists("mqvpn_ks_t")


def test_failed_undo_is_kept_for_the_next_start(tmp_path, nl, monkeypatch):
    path = str(tmp_path / "j")
    journal = ChangeJournal(path)
    journal.set_sysctl(nl, "net/ipv4/ip_forward", 1)
    journal.record("nft_table", name="mqvpn_x")
    monkeypatch.setattr(nft, "NFT", str(tmp_path / "no-nft"))
    failures = journal.undo_all(nl)
    assert len(failures) == 1 and "nft_table" in failures[0]
    assert nl.get_sysctl("net/ipv4/ip_forward") == "0"  # the rest was undone
    assert [r["kind"] for r in read_records(path)] == ["nft_table"]
    assert [e["kind"] for e in journal.entries] == ["nft_table"]
    with pytest.raises(JournalBusy):  # still ours after the rewrite
        ChangeJournal(path)
    journal.close()
    monkeypatch.undo()
    assert ChangeJournal.recover(path, nl) == 1
    assert not os.path.exists(path)


def test_dns_backup_journalled(tmp_path, nl):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    journal = ChangeJournal(str(tmp_path / "j"))
    override = dns.DnsOverride(
        ["10.8.0.1"],
        "mqt0",
        resolv_conf=str(resolv),
        backup_dir=str(tmp_path / "run"),
        use_resolved=False,
        journal=journal,
    )
    override.apply()
    assert "10.8.0.1" in resolv.read_text()
    assert [e["kind"] for e in journal.entries] == ["resolv_backup"]
    # the process dies here: no override.restore(); the journal brings the original back
    assert journal.undo_all(nl) == []
    assert resolv.read_text() == "nameserver 192.0.2.53\n"


# --- crash: a child process makes changes and is killed; the parent recovers ---------------------------------------
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from mqvpn.linux.journal import ChangeJournal
    from mqvpn.linux.netlink import Netlink, NetlinkError

    path, mode = sys.argv[1], sys.argv[2]
    with Netlink() as nl:
        journal = ChangeJournal(path)
        journal.set_sysctl(nl, "net/ipv4/ip_forward", 1)
        journal.add_address(nl, "mqv0", "10.21.0.1/24")
        journal.add_route(nl, "192.0.2.50/32", dev="mqv0", gateway="10.20.0.254")
        journal.add_route(nl, "0.0.0.0/1", dev="mqv0")
        if mode == "between":
            # recorded, not yet done: the crash falls between the record and the change
            journal.record("route_added", dst="128.0.0.0/1", dev="mqv0", gateway=None, table=None)
            os.kill(os.getpid(), signal.SIGKILL)
        journal.add_route(nl, "128.0.0.0/1", dev="mqv0")
        print("ready", flush=True)
        sys.stdin.readline()  # wait to be killed
    """
)


def run_child(path: str, mode: str) -> subprocess.Popen:
    # started from this thread, the child is in the test's namespace
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src")}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, path, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.parametrize("mode", ["killed", "between"])
def test_recover_after_a_crash(tmp_path, nl, veth, mode):
    before = snapshot(nl)
    path = str(tmp_path / "run" / "mqv0.journal")
    child = run_child(path, mode)
    try:
        if mode == "killed":
            ready, _, _ = select.select([child.stdout], [], [], 20)
            assert ready and child.stdout.readline().strip() == "ready"
            assert nl.route_to("8.8.8.8").dev == "mqv0" and nl.get_sysctl("net/ipv4/ip_forward") == "1"
            with pytest.raises(JournalBusy):  # the child is alive: hands off its journal
                ChangeJournal.recover(path, nl)
            child.send_signal(signal.SIGKILL)
        assert child.wait(20) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert snapshot(nl) != before
    kinds = [r["kind"] for r in read_records(path)]
    assert kinds.count("route_added") == 3
    assert ChangeJournal.recover(path, nl) == 5
    assert snapshot(nl) == before
    assert not os.path.exists(path)
    assert ChangeJournal.recover(path, nl) == 0


def test_recover_a_crashed_dns_override(tmp_path, nl):
    """The file path survives a crash even without the journal: restore_stale finds the backup."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    run = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "from mqvpn.linux.dns import DnsOverride\n"
        f"DnsOverride(['10.8.0.1'], 'mqt0', resolv_conf={str(resolv)!r}, backup_dir={str(run)!r},"
        " use_resolved=False).apply()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -signal.SIGKILL
    assert "10.8.0.1" in resolv.read_text()
    assert dns.DnsOverride.restore_stale(resolv_conf=str(resolv), backup_dir=str(run), tun_name="mqt0")
    assert resolv.read_text() == "nameserver 192.0.2.53\n"
    shutil.rmtree(run)

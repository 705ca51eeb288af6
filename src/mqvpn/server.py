"""The VPN server daemon: one UDP socket, many clients, a TUN with the pool's first address, NAT to the Internet.

Data path, top to bottom (the hot path; no per-packet logging or objects beyond the packet bytes):
  client -> server:  QUIC DATAGRAM -> H3 handler -> ServerSession._on_datagram (anti-spoofing) -> tun.write
  server -> client:  tun readable -> read_batch -> TTL/hop limit - 1 -> session by destination address (one dict
                     lookup) -> size check against that client's datagram room (ICMP Packet Too Big if larger)
                     -> session.send_packet -> one transmit per touched connection at the end of the loop turn.
Everything the server changes on the host (TUN, addresses, ip_forward, the NAT table) is written to a journal
before it is done and undone on exit; a crashed run's leftovers are undone at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from mqvpn.linux.journal import JournalBusy, run_dir
from mqvpn.masque.auth import KeyStore
from mqvpn.masque.connectip import ConnectIpService, ServerSession
from mqvpn.masque.pool import AddressPool
from mqvpn.quic.config import QuicConfiguration
from mqvpn.quic.congestion.base import congestion_control_name
from mqvpn.tunnel import ALPN_H3, TunnelServer

_log = logging.getLogger("mqvpn.server")

DEFAULT_SERVER_MTU = 1400  # the reference's automatic server TUN MTU is 1382; ours follows the largest client room
ICMP_PER_SECOND = 100
DEFAULT_MAX_PATH_ID = 16


def server_quic_configuration(settings: Any) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN_H3],
        idle_timeout=120.0,  # like the reference; clients send keep-alives
        congestion_control=congestion_control_name(settings),
        scheduler=getattr(settings, "scheduler", None) or "wlb",
        datagram_queue_limit=1024,
        # multipath clients may open paths: grant path IDs (they are never reused, so leave room)
        initial_max_path_id=settings.init_max_path_id or DEFAULT_MAX_PATH_ID,
    )
    cfg.load_cert_chain(settings.cert, settings.key)
    return cfg


class VpnServer:
    """Owns the TUN, the host configuration and the TunnelServer."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.keys = KeyStore(settings.auth_key or None, dict(settings.users or {}))
        self.pool4 = AddressPool(settings.subnet) if settings.subnet else None
        self.pool6 = AddressPool(settings.subnet6) if getattr(settings, "subnet6", None) else None
        self.service = ConnectIpService(keys=self.keys, pool4=self.pool4, pool6=self.pool6,
                                        max_clients=settings.max_clients, on_packet=self._to_tun)
        self.tunnels: TunnelServer | None = None
        self.tun = None
        self.journal = None
        self._stop = asyncio.Event()
        self._icmp_limiter = None
        self.ttl_expired = 0
        self.too_big = 0

    # --- data path -------------------------------------------------------------------------------------------

    def _to_tun(self, packet: bytes, session: ServerSession) -> None:
        self.tun.write(packet)

    def _on_tun_readable(self) -> None:
        from mqvpn.linux.icmp import decrement_ttl

        table_get = self.service.table.lookup_raw
        touched: dict[Any, None] = {}
        counters = self.service.counters
        for packet in self.tun.read_batch(64):
            version = packet[0] >> 4
            if version == 4:
                dst = packet[16:20]
            elif version == 6:
                dst = packet[24:40]
            else:
                continue
            session = table_get(dst)
            if session is None:
                counters.no_session_dropped += 1
                continue
            out = decrement_ttl(packet)  # RFC 9484 §4.3: on encapsulation
            if out is None:
                self._icmp_back(packet, "ttl")
                continue
            if len(out) > session.quic.datagram_room - len(session._prefix):
                self._icmp_back(packet, "mtu", session.quic.datagram_room - len(session._prefix))
                continue
            if session.send_packet(out):
                touched[session.h3_link] = None
        for link in touched:
            link.transmit()

    def _icmp_back(self, packet: bytes, kind: str, mtu: int = 0) -> None:
        from mqvpn.linux import icmp

        if not self._icmp_limiter.allow():
            return
        own = self._own_address(packet[0] >> 4)
        if own is None:
            return
        if kind == "ttl":
            self.ttl_expired += 1
            reply = icmp.time_exceeded(packet, own)
        else:
            self.too_big += 1
            reply = icmp.packet_too_big(packet, mtu, own)
        if reply:
            self.tun.write(reply)

    def _own_address(self, version: int):
        pool = self.pool4 if version == 4 else self.pool6
        return pool.server_address if pool is not None else None

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def run(self) -> int:
        from mqvpn.linux import icmp
        from mqvpn.linux.journal import ChangeJournal
        from mqvpn.linux.netlink import Netlink
        from mqvpn.linux.tun import Tun

        s = self.settings
        loop = asyncio.get_running_loop()
        self._icmp_limiter = icmp.RateLimiter(ICMP_PER_SECOND, ICMP_PER_SECOND)
        journal_path = os.path.join(run_dir(), f"server-{s.tun_name}.journal")
        with Netlink() as nl:
            if ChangeJournal.recover(journal_path, nl):
                _log.warning("undid the leftovers of a previous run that did not exit cleanly")
        self.journal = ChangeJournal(journal_path)
        try:
            self._setup_host(Tun, Netlink)
            self.tunnels = TunnelServer(self.service, server_quic_configuration(s))
            listen = s.listen
            addr = await self.tunnels.start(listen)
            _log.info("listening on %s:%d (UDP), TUN %s %s, pool %s%s, up to %d clients", addr[0], addr[1],
                      self.tun.name, self.pool4.server_address if self.pool4 else "",
                      s.subnet, f" + {s.subnet6}" if self.pool6 else "", s.max_clients)
            loop.add_reader(self.tun.fd, self._on_tun_readable)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
            await self._stop.wait()
            _log.info("shutting down: closing every client connection")
            return 0
        finally:
            await self._teardown()

    def _setup_host(self, Tun, Netlink) -> None:
        from mqvpn.linux import nft

        s = self.settings
        j = self.journal
        j.record("tun", name=s.tun_name)
        self.tun = Tun.open(s.tun_name, mtu=s.mtu or DEFAULT_SERVER_MTU)
        with Netlink() as nl:
            if self.pool6 is None:
                nl.set_sysctl(f"net/ipv6/conf/{s.tun_name}/disable_ipv6", "1")  # goes with the interface
            if self.pool4 is not None:
                j.add_address(nl, s.tun_name, f"{self.pool4.server_address}/{self.pool4.network.prefixlen}")
            if self.pool6 is not None:
                j.add_address(nl, s.tun_name, f"{self.pool6.server_address}/{self.pool6.network.prefixlen}")
            nl.set_link(s.tun_name, up=True)
            j.set_sysctl(nl, "net/ipv4/ip_forward", "1")
            if self.pool6 is not None:
                j.set_sysctl(nl, "net/ipv6/conf/all/forwarding", "1")
        if getattr(s, "nat", True):
            table = f"mqvpn_nat_{s.tun_name}"
            j.record("nft_table", name=table, family="inet")
            nft.install_nat(table, str(s.subnet) if self.pool4 else None,
                            str(s.subnet6) if self.pool6 else None, tun_name=s.tun_name)

    async def _teardown(self) -> None:
        from mqvpn.linux.netlink import Netlink

        loop = asyncio.get_running_loop()
        if self.tun is not None:
            try:
                loop.remove_reader(self.tun.fd)
            except (ValueError, OSError):
                pass
        if self.tunnels is not None:
            self.tunnels.close(0, "server shutting down")
            await asyncio.sleep(0.2)  # let the CONNECTION_CLOSE frames leave
        if self.tun is not None:
            self.tun.close()
        if self.journal is not None:
            with Netlink() as nl:
                self.journal.undo_all(nl)
        _log.info("stopped; host configuration restored")


def run_server(settings: Any) -> int:
    try:
        return asyncio.run(VpnServer(settings).run())
    except JournalBusy:
        _log.error("another mqvpn server with TUN %s is running on this host (stop it first)", settings.tun_name)
        return 1
    except PermissionError as exc:
        _log.error("%s (the server needs root or CAP_NET_ADMIN)", exc)
        return 1
    except OSError as exc:
        _log.error("%s", exc)
        return 1

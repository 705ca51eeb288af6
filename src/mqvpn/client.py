"""The VPN client daemon: a CONNECT-IP tunnel to the server, a TUN with the assigned address, routes, DNS,
kill switch, reconnect with backoff.

Data path, top to bottom (the hot path):
  TUN -> server:   tun readable -> read_batch -> TTL/hop limit - 1 (Time Exceeded at 0) -> size check against the
                   tunnel's room (ICMP Packet Too Big back into the TUN) -> tunnel.cip.send_packet -> one transmit
                   at the end of the batch (GSO batches on the socket).
  server -> TUN:   QUIC DATAGRAM -> H3 handler -> ConnectIpClient._on_datagram -> tun.write.
Everything changed on the host is journalled first and undone on exit (and at the next start after a crash).
The kill switch stays while reconnecting and goes only on a clean exit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import signal
import socket
from typing import Any

from mqvpn.linux.journal import JournalBusy, run_dir
from mqvpn.masque.connectip import AddressesAssigned, TunnelClosed
from mqvpn.quic.config import QuicConfiguration
from mqvpn.quic.congestion.base import congestion_control_name
from mqvpn.quic.events import MtuUpdated, PathAbandoned, PathLiveness, PathValidated
from mqvpn.quic.path import PathState
from mqvpn.tunnel import ALPN_H3, Tunnel, TunnelError, open_tunnel

_log = logging.getLogger("mqvpn.client")

BACKOFF_MAX = 60.0
DEFAULT_MAX_PATH_ID = 8  # open path IDs at a time (an abandoned one is replaced by the server 3 PTO later)
FIRST_PATH_TRY = 4.0  # seconds a handshake may take over one --path interface before the next one is tried
PATH_KEEPER_INTERVAL = 2.0  # seconds between checks that every usable --path interface has a path
IPV6_MIN_MTU = 1280
ICMP_PER_SECOND = 100
SPLIT_ROUTES_V4 = ("0.0.0.0/1", "128.0.0.0/1")
SPLIT_ROUTES_V6 = ("::/1", "8000::/1")


def client_quic_configuration(settings: Any) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN_H3],
        server_name=settings.tls_server_name or settings.server[0].strip("[]"),
        verify_peer=not settings.insecure,
        cafile=getattr(settings, "ca", None),
        # A quiet tunnel sends a PING every 5 s (NAT bindings, the idle timer); a server that stops answering is
        # given up after 15 s of silence (the effective idle timeout is the smaller of both sides') and the client
        # reconnects.
        idle_timeout=15.0,
        keepalive_interval=5.0,
        congestion_control=congestion_control_name(settings),
        scheduler=getattr(settings, "scheduler", None) or "wlb",
        datagram_queue_limit=1024,
        # multipath (draft-ietf-quic-multipath-21) when the user gave more than one --path
        initial_max_path_id=(settings.init_max_path_id or DEFAULT_MAX_PATH_ID) if len(settings.paths or ()) > 1
        else None,
    )
    return cfg


def backoff_delays(start: float, maximum: float = BACKOFF_MAX, rng: random.Random | None = None):
    """Reconnect delays: exponential from ``start`` to ``maximum``, each with up to 25 % random jitter."""
    rng = rng or random.Random()
    delay = max(start, 0.1)
    while True:
        yield delay * (1 + rng.uniform(-0.25, 0.25))
        delay = min(delay * 2, maximum)


class VpnClient:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.tun = None
        self.tunnel: Tunnel | None = None
        self.journal = None
        self.server_ip: str | None = None
        self.routes_installed = False
        self.dns = None
        self.kill_switch_table: str | None = None
        self.reconnects = 0
        self.last_error: str | None = None
        self._stop = asyncio.Event()
        self._icmp_limiter = None
        self._addresses: list = []
        self._mtu = 0
        self._path_names: dict[int, str] = {}  # path ID -> interface
        self._iface_path: dict[str, int] = {}  # --path interface -> the path ID serving it now
        self._path_sockets: dict[int, tuple] = {}  # path ID -> its own socket (paths after the first)
        self._watcher = None  # LinkWatcher over the --path interfaces (carrier, addresses)
        self._keeper: asyncio.Task | None = None

    # --- data path -------------------------------------------------------------------------------------------

    def _from_tunnel(self, packet: bytes) -> None:
        self.tun.write(packet)

    def _on_tun_readable(self) -> None:
        from mqvpn.linux.icmp import decrement_ttl

        tunnel = self.tunnel
        if tunnel is None or tunnel.closed:
            self.tun.read_batch(64)  # drain: nothing can go out now (the kill switch keeps it off the uplink)
            return
        cip = tunnel.cip
        room = cip.max_ip_packet_size
        send = cip.send_packet
        sent = False
        for packet in self.tun.read_batch(64):
            out = decrement_ttl(packet)
            if out is None:
                self._icmp_back(packet, "ttl")
                continue
            if len(out) > room:
                self._icmp_back(packet, "mtu", room)
                continue
            sent = send(out) or sent
        if sent:
            tunnel.handle.transmit()

    def _icmp_back(self, packet: bytes, kind: str, mtu: int = 0) -> None:
        from mqvpn.linux import icmp

        if not self._icmp_limiter.allow():
            return
        version = packet[0] >> 4
        own = next((a.network_address for a in self._addresses if a.version == version), None)
        if own is None:
            return
        reply = icmp.time_exceeded(packet, own) if kind == "ttl" else icmp.packet_too_big(packet, mtu, own)
        if reply:
            self.tun.write(reply)

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def run(self) -> int:
        from mqvpn.linux import icmp
        from mqvpn.linux.journal import ChangeJournal
        from mqvpn.linux.netlink import Netlink

        s = self.settings
        loop = asyncio.get_running_loop()
        self._icmp_limiter = icmp.RateLimiter(ICMP_PER_SECOND, ICMP_PER_SECOND)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        journal_path = os.path.join(run_dir(), f"client-{s.tun_name}.journal")
        with Netlink() as nl:
            if ChangeJournal.recover(journal_path, nl):
                _log.warning("undid the leftovers of a previous run that did not exit cleanly")
        from mqvpn.linux.dns import DnsOverride

        if DnsOverride.restore_stale(backup_dir=run_dir(), tun_name=s.tun_name):
            _log.warning("restored /etc/resolv.conf from a previous run that did not exit cleanly")
        self.journal = ChangeJournal(journal_path)
        host, port = s.server
        exit_code = 0
        if s.paths:
            self._start_link_watcher(list(s.paths))
        try:
            self.server_ip = await self._resolve(host, port)
            if s.kill_switch:
                self._install_kill_switch(port)
            delays = backoff_delays(float(s.reconnect_interval or 5))
            while not self._stop.is_set():
                try:
                    await self._connect_once()
                except TunnelError as exc:
                    if self._stop.is_set():
                        break  # SIGINT/SIGTERM while connecting: a clean exit
                    self.last_error = str(exc)
                    if not exc.retry:
                        _log.error("%s: not retrying (check the key)", exc)
                        exit_code = 1
                        break
                    if not s.reconnect:
                        _log.error("%s", exc)
                        exit_code = 1
                        break
                    delay = next(delays)
                    _log.warning("%s; reconnecting in %.1f s", exc, delay)
                    await self._sleep_or_stop(delay)
                    self.reconnects += 1
                    continue
                delays = backoff_delays(float(s.reconnect_interval or 5))
                await self._serve_tunnel()
                if self._stop.is_set():
                    break
                if not s.reconnect:
                    _log.error("tunnel lost: %s; reconnect disabled", self.last_error)
                    exit_code = 1
                    break
                delay = next(delays)
                _log.warning("tunnel lost (%s); reconnecting in %.1f s", self.last_error, delay)
                await self._sleep_or_stop(delay)
                self.reconnects += 1
            return exit_code
        finally:
            await self._teardown(clean=True)

    async def _resolve(self, host: str, port: int) -> str:
        infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), port, type=socket.SOCK_DGRAM)
        return infos[0][4][0]

    async def _sleep_or_stop(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def _connect_once(self) -> None:
        """Connect over the first usable --path interface; a dead one does not block the connect: after
        FIRST_PATH_TRY seconds without a handshake the next interface is tried."""
        s = self.settings
        paths = list(s.paths or ())
        candidates = [i for i in paths if self._watcher is None or self._watcher.usable(i)] or paths
        candidates += [i for i in paths if i not in candidates]
        attempts = candidates or [None]
        for n, iface in enumerate(attempts):
            last = n == len(attempts) - 1
            options = {"bind_device": iface} if iface else {}
            opening = asyncio.ensure_future(open_tunnel(
                (self.server_ip, s.server[1]), client_quic_configuration(s), auth_key=s.auth_key,
                on_packet=self._from_tunnel, authority=_authority(s.server),
                timeout=10.0 if last else FIRST_PATH_TRY, **options))
            stopper = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait({opening, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if opening not in done:
                opening.cancel()
                raise TunnelError("stopped", retry=False)
            stopper.cancel()
            try:
                self.tunnel = opening.result()
            except TunnelError as exc:
                if last or not exc.retry:
                    raise
                _log.warning("no handshake over %s (%s): trying %s", iface, exc, attempts[n + 1])
                continue
            break
        self._path_names = {0: iface or "the default route"}
        self._iface_path = {iface: 0} if iface else {}
        self._path_sockets = {}
        _log.info("connected to %s:%d%s, address %s", s.server[0], s.server[1],
                  f" over {iface}" if iface else "", ", ".join(str(a) for a in self.tunnel.addresses))
        others = [i for i in paths if i != iface]
        if others and not self.tunnel.handle.quic.multipath:
            _log.warning("the server does not support multipath QUIC: using %s only", iface)
            return
        for other in others:
            if self._watcher is None or self._watcher.usable(other):
                self._open_path(other)
        self.tunnel.handle.transmit()

    def _path_name(self, path_id: int) -> str:
        return self._path_names.get(path_id, "?")

    def _path_live(self, path_id: int | None) -> bool:
        if path_id is None or self.tunnel is None:
            return False
        path = self.tunnel.handle.quic._paths.get(path_id)
        return path is not None and path.state != PathState.ABANDONED

    def _open_path(self, iface: str) -> int | None:
        """A fresh UDP socket bound to ``iface`` (SO_BINDTODEVICE) and a new QUIC path (path ID) over it."""
        tunnel = self.tunnel
        quic = tunnel.handle.quic
        if not quic.multipath or self._path_live(self._iface_path.get(iface)):
            return None
        endpoint = tunnel.handle.endpoint
        family_any = "::" if ":" in self.server_ip else "0.0.0.0"
        try:
            key = endpoint.open_socket((family_any, 0), bind_device=iface)
        except OSError as exc:
            _log.warning("path over %s: cannot open a socket: %s", iface, exc)
            return None
        path_id = quic.open_path(key, (self.server_ip, self.settings.server[1]),
                                 asyncio.get_running_loop().time())
        if path_id is None:
            _log.info("path over %s: no path ID available yet (retrying)", iface)
            endpoint.close_socket(key)
            return None
        previous = self._iface_path.get(iface)
        if previous is not None:
            quic.scheduler.inherit(previous, path_id)  # the same link: start from what was learnt about it
        self._path_names[path_id] = iface
        self._iface_path[iface] = path_id
        self._path_sockets[path_id] = key
        _log.info("path %d over %s: validating", path_id, iface)
        tunnel.handle.transmit()
        return path_id

    def _drop_path(self, path_id: int, reason: str) -> None:
        """The interface of a path went away: abandon the path at once (PATH_ABANDON on another path)."""
        tunnel = self.tunnel
        if tunnel is None or tunnel.closed:
            return
        if self._path_live(path_id):
            if tunnel.handle.quic.abandon_path(path_id):
                _log.warning("path %d over %s: down (%s)", path_id, self._path_name(path_id), reason)
                tunnel.handle.transmit()
        self._close_path_socket(path_id)

    def _close_path_socket(self, path_id: int) -> None:
        key = self._path_sockets.pop(path_id, None)
        if key is not None and self.tunnel is not None:
            # a little later: the PATH_ABANDON (sent on another path) may still need this path's ACKs
            asyncio.get_running_loop().call_later(1.0, self._close_socket_key, self.tunnel.handle.endpoint, key)

    @staticmethod
    def _close_socket_key(endpoint, key) -> None:
        try:
            endpoint.close_socket(key)
        except (ValueError, OSError):
            pass

    # --- link watching and path keeping ---------------------------------------------------------------------

    def _start_link_watcher(self, interfaces: list[str]) -> None:
        from mqvpn.linux.linkwatch import LinkWatcher

        try:
            watcher = LinkWatcher(interfaces, self._on_link_change)
            watcher.start(asyncio.get_running_loop())
        except OSError as exc:
            _log.warning("cannot watch links (%s): paths follow PTOs only", exc)
            return
        self._watcher = watcher

    def _on_link_change(self, iface: str, usable: bool) -> None:
        if self.tunnel is None or self.tunnel.closed:
            return
        path_id = self._iface_path.get(iface)
        if not usable:
            if path_id is not None:
                self._drop_path(path_id, "link lost")
        elif not self._path_live(path_id):
            self._open_path(iface)

    async def _keep_paths(self) -> None:
        """Backstop (the netlink watch covers link events): every usable --path interface without a live path
        gets a new one, e.g. after the server abandoned it or it stayed dead for long."""
        paths = list(self.settings.paths or ())
        while True:
            await asyncio.sleep(PATH_KEEPER_INTERVAL)
            tunnel = self.tunnel
            if tunnel is None or tunnel.closed or not tunnel.handle.quic.multipath:
                continue
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("paths: %s", "; ".join(
                    f"{p.path_id} {self._path_name(p.path_id)} {p.state.name.lower()}"
                    f"{' dead' if p.dead_since is not None else ''}{' usable' if p.usable else ''}"
                    f" srtt {p.recovery.rtt.smoothed_rtt * 1000:.1f} ms pto {p.recovery.pto_count}"
                    f" sent {p.packets_sent} received {p.packets_received}"
                    for p in tunnel.handle.quic.paths)
                    + f"; scheduler {quic_stats(tunnel.handle.quic)}")
            for iface in paths:
                if self._watcher is not None and not self._watcher.usable(iface):
                    continue
                if not self._path_live(self._iface_path.get(iface)):
                    self._open_path(iface)

    async def _serve_tunnel(self) -> None:
        """Configure the host for the new tunnel, run until it closes or we are told to stop."""
        tunnel = self.tunnel
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()

        def on_event(event) -> None:
            if isinstance(event, TunnelClosed):
                self.last_error = event.reason
                closed.set()
            elif isinstance(event, AddressesAssigned) and event.addresses:
                self._apply_addresses(event.addresses)

        tunnel.on_event = on_event
        tunnel.on_quic_event = self._on_quic_event
        if tunnel.closed:
            return
        # IPv6 needs a 1280-byte tunnel MTU: give DPLPMTUD (it probes right after the handshake) a moment
        if any(a.version == 6 for a in tunnel.addresses):
            for _ in range(40):
                if tunnel.max_ip_packet_size >= IPV6_MIN_MTU:
                    break
                await asyncio.sleep(0.05)
        self._setup_tun()
        self._apply_addresses(tunnel.addresses)
        self._update_mtu()
        if self.settings.manage_routes and not self.routes_installed:
            self._install_routes()
        if self.settings.dns and self.dns is None:
            self._apply_dns()
        loop.add_reader(self.tun.fd, self._on_tun_readable)
        if len(self.settings.paths or ()) > 1:
            self._keeper = asyncio.ensure_future(self._keep_paths())
        stopper = asyncio.ensure_future(self._stop.wait())
        closer = asyncio.ensure_future(closed.wait())
        await asyncio.wait({stopper, closer}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        closer.cancel()
        loop.remove_reader(self.tun.fd)
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        if self._stop.is_set():
            tunnel.close()
            await asyncio.sleep(0.1)
        self.tunnel = None

    def _on_quic_event(self, event) -> None:
        if isinstance(event, MtuUpdated):
            self._update_mtu()
        elif isinstance(event, PathLiveness):
            if event.alive:
                _log.info("path %d over %s: up (answering again)", event.path_id, self._path_name(event.path_id))
            else:
                _log.warning("path %d over %s: down (not answering; probed about once a second)", event.path_id,
                             self._path_name(event.path_id))
        elif isinstance(event, PathAbandoned):
            if event.by_peer or event.error_code:
                why = "the server abandoned it" if event.by_peer else "not answering for long" \
                    if event.error_code == 0x3E76 else "abandoned"
                _log.warning("path %d over %s: closed (%s)", event.path_id, self._path_name(event.path_id), why)
            self._close_path_socket(event.path_id)
            self._update_mtu()
        elif isinstance(event, PathValidated) and event.path_id:
            _log.info("path %d over %s: up", event.path_id, self._path_name(event.path_id))
            self._update_mtu()

    # --- host configuration ---------------------------------------------------------------------------------

    def _setup_tun(self) -> None:
        if self.tun is not None:
            return
        from mqvpn.linux.tun import Tun

        name = self.settings.tun_name
        self.journal.record("tun", name=name)
        self.tun = Tun.open(name)
        if not any(a.version == 6 for a in self.tunnel.addresses):
            from mqvpn.linux.netlink import Netlink

            with Netlink() as nl:  # no IPv6 in the tunnel: no router solicitations into it either
                nl.set_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")

    def _apply_addresses(self, addresses: list) -> None:
        from mqvpn.linux.netlink import Netlink

        wanted = [a for a in addresses if not a.network_address.is_unspecified]
        if wanted == self._addresses or self.tun is None:
            return
        name = self.tun.name
        with Netlink() as nl:
            for old in self._addresses:
                if old not in wanted:
                    nl.del_address(name, str(old))
            for new in wanted:
                if new not in self._addresses:
                    if new.version == 6 and self._mtu and self._mtu < IPV6_MIN_MTU:
                        continue
                    self.journal.add_address(nl, name, str(new))
            nl.set_link(name, up=True)
        self._addresses = wanted
        _log.info("TUN %s: %s", name, ", ".join(str(a) for a in wanted))

    def _update_mtu(self) -> None:
        if self.tunnel is None or self.tun is None:
            return
        from mqvpn.linux.netlink import Netlink

        mtu = self.tunnel.max_ip_packet_size
        if self.settings.mtu:
            mtu = min(mtu, self.settings.mtu)
        if any(a.version == 6 for a in self._addresses) and mtu < IPV6_MIN_MTU:
            _log.warning("tunnel room %d < 1280: IPv6 needs 1280 (RFC 9484 §10.1)", mtu)
        if mtu != self._mtu and mtu >= 576:
            with Netlink() as nl:
                nl.set_link(self.tun.name, mtu=mtu)
            _log.info("TUN %s MTU %d", self.tun.name, mtu)
            self._mtu = mtu

    def _install_routes(self) -> None:
        from mqvpn.linux.netlink import Netlink

        name = self.tun.name
        with Netlink() as nl:
            pin = nl.route_to(self.server_ip)
            server_net = f"{self.server_ip}/{32 if ':' not in self.server_ip else 128}"
            if pin is not None and (pin.gateway or pin.dev) and pin.dev != name:
                self.journal.add_route(nl, server_net, dev=pin.dev, gateway=pin.gateway)
            for dst in SPLIT_ROUTES_V4:
                self.journal.add_route(nl, dst, dev=name)
            if any(a.version == 6 for a in self._addresses):
                for dst in SPLIT_ROUTES_V6:
                    self.journal.add_route(nl, dst, dev=name)
        self.routes_installed = True
        _log.info("routes: all traffic via %s (server %s pinned via %s)", name, self.server_ip,
                  (pin.gateway or pin.dev) if pin else "-")

    def _apply_dns(self) -> None:
        from mqvpn.linux.dns import DnsOverride

        self.dns = DnsOverride(list(self.settings.dns), self.tun.name, backup_dir=run_dir(), journal=self.journal)
        self.dns.apply()
        _log.info("DNS: %s", ", ".join(self.settings.dns))

    def _install_kill_switch(self, port: int) -> None:
        from mqvpn.linux import nft

        table = f"mqvpn_ks_{self.settings.tun_name}"
        self.kill_switch_table = table
        # journalled: a crashed client keeps it (no leak) until its next start; the clean exit removes it
        self.journal.record("nft_table", name=table, family="inet")
        nft.install_kill_switch(table, tun_name=self.settings.tun_name, servers=[(self.server_ip, port)])
        _log.info("kill switch on: only the tunnel's UDP to %s:%d leaves this host", self.server_ip, port)

    async def _teardown(self, clean: bool) -> None:
        from mqvpn.linux.netlink import Netlink

        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

        if self.tunnel is not None and not self.tunnel.closed:
            self.tunnel.close()
            await asyncio.sleep(0.1)
        if self.dns is not None:
            self.dns.restore()
            self.dns = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        if self.journal is not None:
            with Netlink() as nl:
                self.journal.undo_all(nl)
        if clean and self.kill_switch_table is not None:
            from mqvpn.linux import nft

            nft.delete_table(self.kill_switch_table)
        _log.info("stopped; routes, DNS and addresses restored")


def quic_stats(quic) -> str:
    sched = quic.scheduler
    return (f"{sched.name} spills {getattr(sched, 'spills', 0)} moves {getattr(sched, 'moves', 0)}"
            f" dropped {quic.datagrams_dropped}")


def _authority(server: tuple) -> str:
    host, port = server
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def run_client(settings: Any) -> int:
    try:
        return asyncio.run(VpnClient(settings).run())
    except JournalBusy:
        _log.error("another mqvpn client with TUN %s is running on this host (stop it first)", settings.tun_name)
        return 1
    except PermissionError as exc:
        _log.error("%s (the client needs root or CAP_NET_ADMIN)", exc)
        return 1

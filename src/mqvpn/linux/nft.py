"""nftables rulesets of our own: NAT for the server, the client's kill switch.

Each ruleset lives in a table that only mqvpn uses (family ``inet``: one table for IPv4 and IPv6), is built as
the JSON document ``nft -j`` reads (python dicts, no rule text, nothing interpolated into a command line) and is
applied with ``nft -j -f -`` as one transaction: the table is created if missing, deleted, and created again with
its chains and rules, so installing twice replaces and a failure changes nothing. Removing the table removes
everything we added; other tables (the system firewall, Docker ...) are never touched.

An ``accept`` in our table cannot override a ``drop`` in another table on the same hook: every base chain sees
the packet. The kill switch relies on that the other way round: its drops hold whatever other tables accept.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

__all__ = [
    "NftError",
    "apply",
    "list_tables",
    "table_exists",
    "delete_table",
    "nat_ruleset",
    "install_nat",
    "kill_switch_ruleset",
    "install_kill_switch",
    "NFT",
]

NFT = "nft"  # the nft binary (path or name on $PATH)
FAMILY = "inet"
TIMEOUT = 10.0

# Private and link-local ranges the kill switch lets through with allow_lan, plus multicast/broadcast for
# discovery protocols on the local segment.
LAN4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
LAN6 = ("fe80::/10", "fc00::/7", "ff00::/8")
# ICMPv6 neighbour discovery (router solicitation/advertisement, neighbour solicitation/advertisement): without it
# IPv6 cannot reach the gateway, so the tunnel's own UDP over IPv6 could not leave either.
ND_TYPES = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert")


class NftError(Exception):
    """``nft`` refused a command; ``stderr`` is its message."""

    def __init__(self, message: str, stderr: str = "", returncode: int | None = None) -> None:
        super().__init__(f"{message}: {stderr.strip()}" if stderr else message)
        self.stderr = stderr
        self.returncode = returncode


# --- running nft ----------------------------------------------------------------------------------------------
def apply(commands: list[dict]) -> None:
    """Run ``{"nftables": commands}`` through ``nft -j -f -`` as one transaction."""
    _run(["-j", "-f", "-"], json.dumps({"nftables": commands}))


def _run(args: list[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run([NFT, *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise NftError(f"{NFT} not found (install nftables)") from exc
    except subprocess.TimeoutExpired as exc:
        raise NftError(f"{NFT} {' '.join(args)} timed out") from exc
    if proc.returncode != 0:
        raise NftError(f"{NFT} {' '.join(args)} failed", proc.stderr, proc.returncode)
    return proc.stdout


def list_tables() -> list[tuple[str, str]]:
    """Every table as (family, name)."""
    out = json.loads(_run(["-j", "list", "tables"]) or '{"nftables": []}')
    return [(item["table"]["family"], item["table"]["name"]) for item in out["nftables"] if "table" in item]


def table_exists(table: str, family: str = FAMILY) -> bool:
    return (family, table) in list_tables()


def delete_table(table: str, family: str = FAMILY) -> bool:
    """Remove our table and everything in it; False when it was not there."""
    if not table_exists(table, family):
        return False
    ref = {"family": family, "name": table}
    apply([{"add": {"table": ref}}, {"delete": {"table": ref}}])  # "add" first: no error if it vanished meanwhile
    return True


# --- building blocks --------------------------------------------------------------------------------------------
def _fresh_table(table: str) -> list[dict]:
    ref = {"family": FAMILY, "name": table}
    return [{"add": {"table": ref}}, {"delete": {"table": ref}}, {"add": {"table": ref}}]


def _chain(table: str, name: str, kind: str, hook: str, prio: int, policy: str) -> dict:
    return {
        "add": {
            "chain": {
                "family": FAMILY,
                "table": table,
                "name": name,
                "type": kind,
                "hook": hook,
                "prio": prio,
                "policy": policy,
            }
        }
    }


def _rule(table: str, chain: str, *expr: dict) -> dict:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": list(expr)}}}


def _match(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _prefix(cidr: str) -> tuple[str, dict | str]:
    """("ip" or "ip6", the nft JSON value matching the network ``cidr``)."""
    net = ipaddress.ip_network(cidr, strict=False)
    proto = "ip6" if net.version == 6 else "ip"
    if net.prefixlen == net.max_prefixlen:
        return proto, str(net.network_address)
    return proto, {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


ACCEPT = {"accept": None}


# --- NAT (server) -------------------------------------------------------------------------------------------------
def nat_ruleset(
    table: str,
    subnet4: str | None,
    subnet6: str | None = None,
    out_iface: str | None = None,
    *,
    tun_name: str | None = None,
) -> list[dict]:
    """Masquerade what the clients send to the world; forward to and from the TUN.

    postrouting (nat, priority srcnat 100): ``ip saddr <subnet4> oifname <out_iface> masquerade`` (without
    ``out_iface``: ``oifname != <tun>``; without either: everything from the subnet), likewise ``ip6 saddr``.
    forward (filter, priority 0, policy accept): accept ``iifname <tun>`` and ``oifname <tun>`` -- documentation
    of intent more than a rule, see the module note.
    """
    cmds = _fresh_table(table)
    cmds.append(_chain(table, "postrouting", "nat", "postrouting", 100, "accept"))
    for subnet in (subnet4, subnet6):
        if not subnet:
            continue
        proto, value = _prefix(subnet)
        expr = [_match(_payload(proto, "saddr"), value)]
        if out_iface:
            expr.append(_match(_meta("oifname"), out_iface))
        elif tun_name:
            expr.append(_match(_meta("oifname"), tun_name, "!="))
        cmds.append(_rule(table, "postrouting", *expr, {"masquerade": None}))
    if tun_name:
        cmds.append(_chain(table, "forward", "filter", "forward", 0, "accept"))
        cmds.append(_rule(table, "forward", _match(_meta("iifname"), tun_name), ACCEPT))
        cmds.append(_rule(table, "forward", _match(_meta("oifname"), tun_name), ACCEPT))
    return cmds


def install_nat(
    table: str,
    subnet4: str | None,
    subnet6: str | None = None,
    out_iface: str | None = None,
    *,
    tun_name: str | None = None,
) -> None:
    """Install (or replace) the NAT table; see ``nat_ruleset``. Journal ``nft_table`` before calling."""
    if not subnet4 and not subnet6:
        raise ValueError("install_nat needs subnet4 or subnet6")
    apply(nat_ruleset(table, subnet4, subnet6, out_iface, tun_name=tun_name))


# --- kill switch (client) -----------------------------------------------------------------------------------------
def kill_switch_ruleset(
    table: str, *, tun_name: str, servers: list[tuple[str, int]], allow_lan: bool = False
) -> list[dict]:
    """Drop everything that does not go through the tunnel.

    Chains output, input, forward (filter, priority 0, policy drop) accept only:
      - loopback (``oifname/iifname "lo"``) and the TUN (by name, so the rules hold while the TUN is gone
        during a reconnect);
      - the tunnel's own UDP: ``ip[6] daddr <server> udp dport <port>`` out, ``ip[6] saddr <server> udp sport
        <port>`` in, one pair per server (give resolved addresses: DNS outside the tunnel is blocked too);
      - ICMPv6 neighbour discovery (link-local plumbing the UDP to an IPv6 server needs) and DHCP client traffic
        (udp 68->67, 546->547 and back) so the uplink keeps its address;
      - with ``allow_lan``: private, link-local and multicast ranges (RFC 1918, 169.254/16, fc00::/7, fe80::/10).
    No ``ct state established`` rule: a connection opened before the kill switch must not keep leaking; the
    server rules already cover both directions of the tunnel. DPLPMTUD needs no ICMP (RFC 8899).
    """
    cmds = _fresh_table(table)
    for chain, hook in (("output", "output"), ("input", "input"), ("forward", "forward")):
        cmds.append(_chain(table, chain, "filter", hook, 0, "drop"))
    for chain, iface in (("output", "oifname"), ("input", "iifname")):
        cmds.append(_rule(table, chain, _match(_meta(iface), "lo"), ACCEPT))
        cmds.append(_rule(table, chain, _match(_meta(iface), tun_name), ACCEPT))
    cmds.append(_rule(table, "forward", _match(_meta("iifname"), tun_name), ACCEPT))
    cmds.append(_rule(table, "forward", _match(_meta("oifname"), tun_name), ACCEPT))
    for host, port in servers:
        proto, value = _prefix(host)
        cmds.append(
            _rule(
                table, "output", _match(_payload(proto, "daddr"), value), _match(_payload("udp", "dport"), port), ACCEPT
            )
        )
        cmds.append(
            _rule(
                table, "input", _match(_payload(proto, "saddr"), value), _match(_payload("udp", "sport"), port), ACCEPT
            )
        )
    for chain in ("output", "input"):
        cmds.append(_rule(table, chain, _match(_payload("icmpv6", "type"), {"set": list(ND_TYPES)}), ACCEPT))
    for client, server in ((68, 67), (546, 547)):
        ports_out = (_match(_payload("udp", "sport"), client), _match(_payload("udp", "dport"), server))
        ports_in = (_match(_payload("udp", "sport"), server), _match(_payload("udp", "dport"), client))
        cmds.append(_rule(table, "output", *ports_out, ACCEPT))
        cmds.append(_rule(table, "input", *ports_in, ACCEPT))
    if allow_lan:
        for cidr in LAN4 + LAN6:
            proto, value = _prefix(cidr)
            for chain, field in (("output", "daddr"), ("input", "saddr"), ("forward", "daddr")):
                cmds.append(_rule(table, chain, _match(_payload(proto, field), value), ACCEPT))
    return cmds


def install_kill_switch(table: str, *, tun_name: str, servers: list[tuple[str, int]], allow_lan: bool = False) -> None:
    """Install (or replace, e.g. with new server addresses) the kill switch; see ``kill_switch_ruleset``.

    Replacing is one transaction, so there is no instant without the rules. Journal ``nft_table`` first.
    """
    if not servers:
        raise ValueError("install_kill_switch needs at least one server address")
    apply(kill_switch_ruleset(table, tun_name=tun_name, servers=servers, allow_lan=allow_lan))

"""Which client address a request comes from: pure, so the rules can be property-tested.

The address counts for every per-address limit (joins, failed admin logins) and is written to
the audit log, so a client must not be able to choose it. The socket peer is the only fact
the server has; a forwarded header is a claim, and is believed only as far as the chain of
proxies that wrote it is trusted (``WAITROOM_TRUSTED_PROXIES``, CIDR networks, none by
default):

- the peer is not a trusted proxy (or none is configured): the peer is the client, and any
  forwarded header is ignored, whoever wrote it;
- the peer is trusted: ``X-Forwarded-For`` is read from the right (each proxy appends the
  address it received the request from), trusted hops are skipped, and the first hop that is
  not trusted is the client. Entries to its left were written by the client or by proxies
  nobody vouches for, so a spoofed leftmost entry never wins.
- a hop that is not an IP address (``unknown``, garbage, an obfuscated RFC 7239 name) ends
  the walk with the peer's own address: only a trusted proxy could have put it there, and a
  validated address is the one thing this module promises.

Only ``X-Forwarded-For`` is read, never the standard ``Forwarded`` header as well: each proxy
rewrites or appends to the one header it knows, so a client could put any address in the
other one and, read from the right, it would be the "rightmost untrusted hop". HAProxy
(``option forwardfor``), nginx (``$proxy_add_x_forwarded_for``) and the cloud load balancers
all write ``X-Forwarded-For``.

IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``, from a dual-stack socket) are unmapped
before anything is compared. For limits, an IPv6 address counts as its /64: one host (one
home connection) usually holds a whole /64, and limiting single addresses would not limit it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Hops read from the right of X-Forwarded-For at most: no real chain of trusted proxies is
#: longer, and the walk must stay cheap whatever a client sends.
MAX_HOPS = 16
#: Longest hop text looked at: "[ffff:...:ffff]:65535" is 47 characters.
_MAX_HOP_CHARS = 64
#: The subject of a connection without a usable peer address (a Unix socket, a test client).
UNKNOWN = "unknown"


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """CIDR networks (or single addresses) from text; ``ValueError`` naming a bad entry.

    Host bits are refused (``10.0.0.1/8`` is almost certainly a typo for something else).
    """
    networks: list[Network] = []
    for entry in entries:
        text = entry.strip()
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError:
            raise ValueError(text) from None
        if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
            # ::ffff:10.0.0.0/104 would never match: addresses are unmapped before comparing.
            mapped = network.network_address.ipv4_mapped
            network = ipaddress.IPv4Network((mapped, max(0, network.prefixlen - 96)))
        networks.append(network)
    return tuple(networks)


@functools.lru_cache(maxsize=8)
def trusted_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """:func:`parse_networks` of a settings tuple, parsed once per process."""
    return parse_networks(entries)


def parse_ip(text: str) -> IPAddress | None:
    """The address in one hop (``a.b.c.d``, ``a.b.c.d:port``, ``v6``, ``[v6]:port``), unmapped.

    None for anything else: names, ``unknown``, zone ids, empty or oversized text.
    """
    text = text.strip()
    if not text or len(text) > _MAX_HOP_CHARS:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not _is_port_suffix(text[end + 1 :])):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has two or more
        text, _, port = text.partition(":")
        if not port.isdigit() or len(port) > 5:
            return None
    if "%" in text:  # a zone id names an interface of the proxy, not a client
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port_suffix(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and 1 <= len(text) - 1 <= 5


def _trusted(address: IPAddress, networks: Sequence[Network]) -> bool:
    # `in` across versions is simply False (IPv4 address in an IPv6 network), never an error.
    return any(address in network for network in networks)


def forwarded_hops(values: Iterable[str]) -> list[str]:
    """The hops of one or more ``X-Forwarded-For`` header lines, in order, the last at most
    :data:`MAX_HOPS` (several lines of a header are one comma-joined list)."""
    hops: list[str] = []
    for value in values:
        hops.extend(value.split(","))
    return hops[-MAX_HOPS:]


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> IPAddress | None:
    """The client's address: the rightmost hop not in ``trusted``, or the peer (see above).

    ``peer`` is the socket peer's address as the server saw it; ``forwarded_for`` the values
    of the request's ``X-Forwarded-For`` lines. None only when the peer itself is not an IP
    address (a Unix socket). Never raises.
    """
    address = parse_ip(peer) if peer else None
    if address is None or not trusted or not _trusted(address, trusted):
        return address
    for hop in reversed(forwarded_hops(forwarded_for)):
        hop_address = parse_ip(hop)
        if hop_address is None:
            return address  # a trusted proxy wrote something that is not an address
        if not _trusted(hop_address, trusted):
            return hop_address
        address = hop_address
    # Every hop is a trusted proxy: the leftmost of them is as far as anyone can vouch.
    return address


def limit_subject(address: IPAddress | None) -> str:
    """Who per-address limits count: an IPv4 address, or an IPv6 address's /64 network."""
    if address is None:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((int(address) >> 64 << 64, 64))
        return f"{network.network_address}/64"
    return str(address)


def client_subject(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str:
    """:func:`limit_subject` of :func:`client_address`, with the join path's shortcut.

    Without trusted proxies an IPv4 peer is taken as the socket gave it (the kernel formats
    it canonically) once it looks like one: parsing it with :mod:`ipaddress` cost 5 us a join
    on the 2-core box, this check 0.4 us.
    """
    if not trusted and peer and peer.count(".") == 3 and peer.replace(".", "").isdigit():
        return peer
    return limit_subject(client_address(peer, forwarded_for, trusted))

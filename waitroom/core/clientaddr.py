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
import socket
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
    """:func:`limit_subject` of :func:`client_address`, without :mod:`ipaddress` for IPv4.

    Every join pays for this, and building :mod:`ipaddress` objects for the peer and each
    hop cost about 15 us of a join of 125 us on the 2-core box. A dotted quad that the C
    library's ``inet_pton`` accepts is already canonical (four decimal octets, no leading
    zeros), so an all-IPv4 chain is walked on integers; anything else (IPv6, a port,
    brackets, garbage) takes the general path, which gives the same answer (property-tested).
    """
    peer_int = _v4_int(peer)
    masks = _v4_masks(trusted) if trusted else ()
    if peer is None or peer_int is None or masks is None:
        return limit_subject(client_address(peer, forwarded_for, trusted))
    if not _v4_trusted(peer_int, masks):
        return peer
    subject = peer
    for hop in reversed(forwarded_hops(forwarded_for)):
        text = hop.strip()
        hop_int = _v4_int(text)
        if hop_int is None:
            return limit_subject(client_address(peer, forwarded_for, trusted))
        if not _v4_trusted(hop_int, masks):
            return text
        subject = text
    return subject


def _v4_int(text: str | None) -> int | None:
    """A canonical dotted quad as an integer, else None (never raises)."""
    if not text or len(text) > 15:
        return None
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        return None


#: :func:`_v4_masks` of each trusted list seen, by identity (the list is kept, so its id is
#: not reused): hashing a tuple of networks costs more than the walk it serves.
_masks_seen: dict[int, tuple[Sequence[Network], tuple[tuple[int, int], ...] | None]] = {}


def _v4_masks(trusted: Sequence[Network]) -> tuple[tuple[int, int], ...] | None:
    """(network, netmask) integers of ``trusted``, all IPv4 networks.

    None when ``trusted`` holds an IPv6 network: an IPv4 address is never in one, but the
    general path then decides, so the two paths have less room to drift apart.
    """
    seen = _masks_seen.get(id(trusted))
    if seen is not None and seen[0] is trusted:
        return seen[1]
    masks: tuple[tuple[int, int], ...] | None = None
    if not any(isinstance(n, ipaddress.IPv6Network) for n in trusted):
        masks = tuple((int(n.network_address), int(n.netmask)) for n in trusted)
    if len(_masks_seen) < 64:
        _masks_seen[id(trusted)] = (trusted, masks)
    return masks


def _v4_trusted(address: int, masks: tuple[tuple[int, int], ...]) -> bool:
    # A loop, not any(generator): this runs on every join, and the generator costs more.
    for network, mask in masks:  # noqa: SIM110
        if address & mask == network:
            return True
    return False


def subnet_of_v4(subject: str) -> str | None:
    """The /24 of an IPv4 subject (``a.b.c.0/24``), or None when it is not a dotted quad."""
    if _v4_int(subject) is None:
        return None
    return subject.rpartition(".")[0] + ".0/24"

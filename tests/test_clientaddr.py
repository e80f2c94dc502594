"""The client address: forwarded headers count only through trusted proxies, and the answer is
always a validated address from the chain or the peer (pure rules; the real proxy is in
tests/test_proxy.py)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waitroom.core.clientaddr import (
    MAX_HOPS,
    client_address,
    client_subject,
    forwarded_hops,
    limit_subject,
    parse_ip,
    parse_networks,
)

PROXIES = parse_networks(["10.0.0.0/8", "fd00::/8"])
ip = ipaddress.ip_address


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_headers_say() -> None:
    assert client_address("203.0.113.7", ["198.51.100.1"], ()) == ip("203.0.113.7")
    assert client_subject("203.0.113.7", ["198.51.100.1"], ()) == "203.0.113.7"


def test_an_untrusted_peer_cannot_forward_for_anyone() -> None:
    assert client_address("203.0.113.7", ["198.51.100.1"], PROXIES) == ip("203.0.113.7")


def test_behind_a_trusted_proxy_the_rightmost_untrusted_hop_is_the_client() -> None:
    # The client wrote "1.1.1.1"; the edge proxy appended the address it saw; an inner
    # proxy appended the edge's.
    chain = ["1.1.1.1, 198.51.100.9, 10.0.0.2"]
    assert client_address("10.0.0.3", chain, PROXIES) == ip("198.51.100.9")


def test_several_header_lines_are_one_list_in_order() -> None:
    assert client_address("10.0.0.3", ["1.1.1.1", "198.51.100.9"], PROXIES) == ip("198.51.100.9")


def test_garbage_where_the_client_should_be_gives_the_peer() -> None:
    assert client_address("10.0.0.3", ["unknown"], PROXIES) == ip("10.0.0.3")
    assert client_address("10.0.0.3", ["198.51.100.9, _hidden"], PROXIES) == ip("10.0.0.3")


def test_a_chain_of_only_trusted_hops_gives_the_leftmost_of_them() -> None:
    assert client_address("10.0.0.3", ["10.1.1.1, 10.0.0.2"], PROXIES) == ip("10.1.1.1")


def test_no_header_from_a_trusted_proxy_gives_the_proxy() -> None:
    assert client_address("10.0.0.3", [], PROXIES) == ip("10.0.0.3")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1:8080 ", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[::ffff:192.0.2.1]:1", "192.0.2.1"),
    ],
)
def test_hops_are_parsed_with_ports_and_brackets_and_unmapped(text: str, expected: str) -> None:
    assert parse_ip(text) == ip(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unknown",
        "example.com",
        "192.0.2.1:x",
        "[2001:db8::1",
        "fe80::1%eth0",
        "1" * 80,
        "1.2.3",
    ],
)
def test_anything_but_an_address_is_not_one(text: str) -> None:
    assert parse_ip(text) is None


def test_ipv4_mapped_peers_and_networks_compare_as_ipv4() -> None:
    mapped = parse_networks(["::ffff:10.0.0.0/104"])
    assert mapped == (ipaddress.IPv4Network("10.0.0.0/8"),)
    assert client_address("::ffff:10.0.0.3", ["198.51.100.9"], PROXIES) == ip("198.51.100.9")


def test_limits_count_ipv4_addresses_and_ipv6_slash_64s() -> None:
    assert limit_subject(ip("192.0.2.1")) == "192.0.2.1"
    assert limit_subject(ip("2001:db8:1:2:3:4:5:6")) == "2001:db8:1:2::/64"
    assert limit_subject(None) == "unknown"
    assert client_subject("2001:db8:1:2::9", [], ()) == "2001:db8:1:2::/64"
    assert client_subject("::ffff:192.0.2.1", [], ()) == "192.0.2.1"
    assert client_subject("testclient", [], ()) == "unknown"


def test_bad_networks_are_refused_naming_the_entry() -> None:
    with pytest.raises(ValueError, match=r"10\.0\.0\.1/8"):
        parse_networks(["10.0.0.0/8", "10.0.0.1/8"])
    with pytest.raises(ValueError):
        parse_networks(["not-a-network"])


def test_only_the_last_hops_of_a_long_header_are_read() -> None:
    hops = forwarded_hops([", ".join(f"10.0.0.{i}" for i in range(100))])
    assert len(hops) == MAX_HOPS
    assert hops[-1].strip() == "10.0.0.99"


# --- properties -------------------------------------------------------------------------

_v4 = st.ip_addresses(v=4)
_v6 = st.ip_addresses(v=6)
_addresses = st.one_of(_v4, _v6)
_garbage = st.text(max_size=30)
_hop_text = st.one_of(_addresses.map(str), _garbage)
_networks = st.lists(
    st.one_of(
        st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False), _v4, st.integers(0, 32)),
        st.builds(
            lambda a, n: ipaddress.ip_network((a, n), strict=False), _v6, st.integers(0, 128)
        ),
    ),
    max_size=4,
)


def _unmapped(text: str) -> str | None:
    parsed = parse_ip(text)
    return None if parsed is None else str(parsed)


@given(
    peer=st.one_of(_addresses.map(str), _garbage),
    hops=st.lists(_hop_text, max_size=20),
    trusted=_networks,
)
def test_the_answer_is_always_a_validated_address_from_the_chain_or_the_peer(
    peer: str, hops: list[str], trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> None:
    header = [", ".join(hops)] if hops else []
    result = client_address(peer, header, tuple(trusted))
    if result is None:
        assert parse_ip(peer) is None
        return
    assert isinstance(result, ipaddress.IPv4Address | ipaddress.IPv6Address)
    candidates = {_unmapped(peer)} | {_unmapped(h) for h in forwarded_hops(header)}
    assert str(result) in candidates
    subject = client_subject(peer, header, tuple(trusted))
    assert subject == limit_subject(result)


@given(
    spoofed=st.lists(_hop_text, min_size=1, max_size=10),
    client=_addresses.filter(lambda a: not a.is_private),
    proxy_hops=st.integers(0, 3),
)
def test_entries_a_client_writes_never_win_behind_trusted_proxies(
    spoofed: list[str], client: ipaddress.IPv4Address | ipaddress.IPv6Address, proxy_hops: int
) -> None:
    # The client's own header, then what honest proxies append: the address each saw.
    proxies = [f"10.0.0.{i + 1}" for i in range(proxy_hops)]
    hops = [*spoofed, str(client), *proxies]
    chain = [", ".join(hops)]
    client_unmapped = parse_ip(str(client))
    assert client_address("10.9.9.9", chain, PROXIES) == client_unmapped


@given(peer=_addresses, spoofed=st.lists(_hop_text, max_size=10))
def test_without_trust_no_header_changes_the_answer(
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address, spoofed: list[str]
) -> None:
    assert client_address(str(peer), [", ".join(spoofed)], ()) == parse_ip(str(peer))


_v4_hop = st.one_of(
    _v4.map(str),
    _v4.map(lambda a: f" {a}:{8080} "),
    _v4.map(lambda a: str(a).replace(".", ".0", 1)),  # a leading zero: not an address
    _v4.map(lambda a: f"::ffff:{a}"),
    _garbage,
)
_v4_networks = st.lists(
    st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False), _v4, st.integers(0, 32)),
    max_size=4,
)


@given(
    peer=st.one_of(_v4.map(str), _v4_hop),
    hops=st.lists(_v4_hop, max_size=8),
    trusted=st.one_of(_v4_networks, _networks),
)
def test_the_ipv4_shortcut_answers_as_the_general_rules_do(
    peer: str, hops: list[str], trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> None:
    # client_subject walks all-IPv4 chains on integers; the rules are client_address's.
    header = [", ".join(hops)] if hops else []
    expected = limit_subject(client_address(peer, header, tuple(trusted)))
    assert client_subject(peer, header, tuple(trusted)) == expected


def test_the_ipv4_shortcut_trusts_only_what_is_configured() -> None:
    proxies = parse_networks(["127.0.0.1/32", "10.0.0.0/8"])
    assert client_subject("127.0.0.1", ["203.0.113.9"], proxies) == "203.0.113.9"
    assert client_subject("127.0.0.1", ["203.0.113.9, 10.1.2.3"], proxies) == "203.0.113.9"
    assert client_subject("127.0.0.2", ["203.0.113.9"], proxies) == "127.0.0.2"
    assert client_subject("127.0.0.1", ["010.1.2.3"], proxies) == "127.0.0.1"
    assert client_subject("127.0.0.1", ["10.1.2.3, 10.0.0.1"], proxies) == "10.1.2.3"

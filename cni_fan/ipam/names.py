"""Record file names: the one canonical text of each address, both ways.

A store's file names are its records, so each address must have exactly one
name and every other name must be a foreign file: IPv4 as dotted decimal
without leading zeros, IPv6 as RFC 5952 section 4 text (hex groups only).
Parsed by hand: this runs for every file of a store on every ADD, and
netaddr's parser is several times slower.
"""
from __future__ import annotations

from netaddr import IPAddress


def _ipv4_from_name(name: str) -> IPAddress | None:
    """Dotted decimal, four octets, no leading zeros, nothing else."""
    parts = name.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 3 or (part[0] == "0" and len(part) > 1):
            return None
        octet = int(part)
        if octet > 255:
            return None
        value = value << 8 | octet
    return IPAddress(value, 4)


_HEX = frozenset("0123456789abcdef")


def ipv6_name(value: int) -> str:
    """The RFC 5952 section 4 text of an IPv6 address (hex groups only); pure, no netaddr.

    Written here rather than taken from str(): netaddr and the ipaddress
    module of some Python versions print IPv4-mapped addresses with a
    dotted tail, and a file name must not change with a library upgrade.
    """
    groups = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best_start, best_len, run_start = -1, 1, -1  # only runs of two or more are compressed
    for i, group in enumerate([*groups, 1]):  # the sentinel closes a trailing run
        if group == 0:
            if run_start < 0:
                run_start = i
        elif run_start >= 0:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = -1
    text = [f"{g:x}" for g in groups]
    if best_start < 0:
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_len:])


def _ipv6_from_name(name: str) -> IPAddress | None:
    """Any hex-and-colons spelling parsed, then kept only if it is the canonical one."""
    if not 2 <= len(name) <= 39 or not set(name) <= _HEX | {":"}:
        return None
    head, double, tail = name.partition("::")
    left = head.split(":") if head else []
    right = tail.split(":") if tail else []
    if (len(left) + len(right) > 7) if double else (len(left) != 8):
        return None
    value = 0
    for group in left + ["0"] * (8 - len(left) - len(right)) + right:
        if not 1 <= len(group) <= 4:  # also rejects "" from ":::" or a stray ":"
            return None
        value = value << 16 | int(group, 16)
    return IPAddress(value, 6) if ipv6_name(value) == name else None


def address_from_name(name: str, version: int = 4) -> IPAddress | None:
    """The `version` address a record file name stands for, or None for any other file.

    Only the canonical form counts (module docstring), so exactly one name
    maps to each address.
    """
    return _ipv4_from_name(name) if version == 4 else _ipv6_from_name(name)


def record_name(addr: IPAddress, version: int = 4) -> str:
    """The file name of `addr` in a store of `version`; ValueError for anything else."""
    if not isinstance(addr, IPAddress) or addr.version != version:
        raise ValueError(f"not an IPv{version} address: {addr!r}")
    return str(addr) if version == 4 else ipv6_name(int(addr))

"""The on-disk store, against real files in a temporary directory."""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from netaddr import IPAddress

from cni_fan.ipam.store import LAST_RESERVED_NAME, LOCK_NAME, OWNERS_DIR, Allocation, AllocationStore

A1 = IPAddress("10.244.3.2")
A2 = IPAddress("10.244.3.3")
A3 = IPAddress("10.244.3.4")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data" / "fan-net"


@pytest.fixture
def store(root: Path) -> AllocationStore:
    return AllocationStore(root)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_root_created_private(root: Path) -> None:
    old = os.umask(0)
    try:
        AllocationStore(root)
    finally:
        os.umask(old)
    assert mode(root) == 0o700


def test_existing_root_is_tightened(root: Path) -> None:
    root.mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o755)
    AllocationStore(root)
    assert mode(root) == 0o700


def test_record_file_content_and_mode(store: AllocationStore, root: Path) -> None:
    old = os.umask(0o022)
    try:
        assert store.reserve(A1, "c1", "eth0")
        store.set_last_reserved(A1)
    finally:
        os.umask(old)
    record = root / "10.244.3.2"
    data = json.loads(record.read_text())
    assert data["containerID"] == "c1" and data["ifname"] == "eth0"
    assert isinstance(data["created"], int)
    for name in ("10.244.3.2", LOCK_NAME, LAST_RESERVED_NAME):
        assert mode(root / name) == 0o600, name
    assert sorted(os.listdir(root)) == sorted(["10.244.3.2", LOCK_NAME, LAST_RESERVED_NAME, OWNERS_DIR])
    [entry] = os.listdir(root / OWNERS_DIR)  # the owner index: a symlink whose text is the address
    assert os.readlink(root / OWNERS_DIR / entry) == "10.244.3.2"


def test_reserve_twice_fails_second_time(store: AllocationStore) -> None:
    assert store.reserve(A1, "c1", "eth0")
    assert not store.reserve(A1, "c2", "eth0")
    assert not store.reserve(A1, "c1", "eth0")
    (only,) = store.records()
    assert (only.addr, only.container_id, only.ifname) == (A1, "c1", "eth0")
    # A failed reserve leaves no temp file behind.
    assert not [n for n in os.listdir(store.root) if n.startswith(".tmp-")]


def test_release_is_idempotent(store: AllocationStore) -> None:
    assert store.reserve(A1, "c1", "eth0")
    assert store.release(A1)
    assert not store.release(A1)
    assert store.records() == []
    assert store.release_by_owner("c1", "eth0") == []
    assert store.release_by_owner("never-seen", "eth0") == []


def test_find_and_release_by_owner(store: AllocationStore) -> None:
    assert store.reserve(A1, "c1", "eth0")
    assert store.reserve(A2, "c1", "net1")
    assert store.reserve(A3, "c2", "eth0")
    assert store.find_by_owner("c1", "eth0") == A1
    assert store.find_by_owner("c1", "net1") == A2
    assert store.find_by_owner("c1", "eth1") is None
    assert store.release_by_owner("c1", "eth0") == [A1]
    assert [r.addr for r in store.records()] == [A2, A3]
    assert store.taken() == {A2, A3}


def test_records_are_allocations_sorted_by_address(store: AllocationStore) -> None:
    store.reserve(IPAddress("10.244.3.10"), "b", "eth0")
    store.reserve(IPAddress("10.244.3.9"), "a", "eth0")
    records = store.records()
    assert [str(r.addr) for r in records] == ["10.244.3.9", "10.244.3.10"]
    assert isinstance(records[0], Allocation)
    with pytest.raises(AttributeError):
        records[0].container_id = "x"  # type: ignore[misc]


def test_last_reserved_round_trip(store: AllocationStore, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert store.last_reserved() is None
    store.set_last_reserved(A2)
    assert store.last_reserved() == A2
    store.set_last_reserved(A3)
    assert store.last_reserved() == A3
    (root / LAST_RESERVED_NAME).write_text("garbage\n")
    with caplog.at_level(logging.WARNING, logger="cni_fan.ipam"):
        assert store.last_reserved() is None
    assert "garbage" in caplog.text


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"containerID": "", "ifname": "eth0", "created": 1}',
     b'{"containerID": 5, "ifname": "eth0", "created": 1}', b'{"ifname": "eth0"}',
     b'{"containerID": "c", "ifname": "eth0", "created": "soon"}', b"\xff\xfe"],
    ids=["empty", "truncated", "list", "empty-id", "int-id", "no-id", "bad-created", "not-utf8"],
)
def test_corrupt_record_is_reported_and_stays_taken(
    store: AllocationStore, root: Path, content: bytes, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (root / str(A1)).write_bytes(content)
    store.reserve(A2, "c2", "eth0")
    with caplog.at_level(logging.WARNING, logger="cni_fan.ipam"):
        records = store.records()
        corrupt = store.corrupt_addresses()
    assert [r.addr for r in records] == [A2]
    assert corrupt == [A1]
    assert A1 in store.taken()
    assert not store.reserve(A1, "c3", "eth0")
    assert any(r.name == "cni_fan.ipam" and r.levelno == logging.WARNING and "10.244.3.2" in r.getMessage()
               for r in caplog.records)
    assert capsys.readouterr().out == ""
    assert store.release(A1)  # GC's way out


def test_unreadable_records_stay_taken(store: AllocationStore, root: Path, tmp_path: Path) -> None:
    (root / str(A1)).mkdir()
    os.symlink(tmp_path / "elsewhere", root / str(A2))
    (tmp_path / "elsewhere").write_text(json.dumps({"containerID": "x", "ifname": "eth0", "created": 1}))
    assert store.records() == []
    assert store.corrupt_addresses() == [A1, A2]
    assert store.taken() == {A1, A2}


def test_foreign_files_are_not_records(store: AllocationStore, root: Path) -> None:
    for name in ("010.244.3.2", "10.244.3", "notes.txt", "last_reserved_ip.0", "::1"):
        (root / name).write_text("{}")
    assert store.records() == [] and store.corrupt_addresses() == [] and store.taken() == set()


def test_temp_files_are_ignored_then_swept(store: AllocationStore, root: Path) -> None:
    (root / ".tmp-999-deadbeef").write_text('{"containerID": "c1", "ifname": "eth0", "created": 1}')
    assert store.records() == [] and store.taken() == set()
    assert store.reserve(A1, "c1", "eth0")
    assert store.sweep_temp_files() == [".tmp-999-deadbeef"]
    assert sorted(os.listdir(root)) == sorted([str(A1), LOCK_NAME, OWNERS_DIR])


@pytest.mark.parametrize(
    "container_id, ifname",
    [("../x", "eth0"), ("../../../../tmp/evil", "../eth0"), ("a\x00b", "eth\x000"),
     ("/etc/passwd", "/"), ("10.244.3.3", "eth0"), (".tmp-1-2", "lock")],
)
def test_path_tricks_never_leave_root(
    store: AllocationStore, root: Path, tmp_path: Path, container_id: str, ifname: str,
) -> None:
    before = {p for p in tmp_path.rglob("*")}
    assert store.reserve(A1, container_id, ifname)
    created = {p for p in tmp_path.rglob("*")} - before
    owners = root / OWNERS_DIR
    assert {p for p in created if p.parent != owners} <= {root / str(A1), root / LOCK_NAME, owners}
    assert [os.readlink(p) for p in created if p.parent == owners] == [str(A1)]
    assert store.find_by_owner(container_id, ifname) == A1
    assert store.taken() == {A1}  # a container ID that looks like an address is still only data
    assert store.release_by_owner(container_id, ifname) == [A1]
    assert set(os.listdir(root)) <= {LOCK_NAME, OWNERS_DIR} and os.listdir(owners) == []


def test_only_ipv4_addresses_name_files(store: AllocationStore) -> None:
    with pytest.raises(ValueError):
        store.reserve("../x", "c", "eth0")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.release(IPAddress("fd00::1"))


def test_lock_is_reentrant_and_excludes_other_holders(store: AllocationStore, root: Path) -> None:
    import fcntl

    with store.locked():
        with store.locked():
            assert store.reserve(A1, "c1", "eth0")
        fd = os.open(root / LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(root / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again after the outer block
    finally:
        os.close(fd)


# -- the owner index -------------------------------------------------------------

def _old_style_store(root: Path, records: dict[str, tuple[str, str]]) -> None:
    """Records as a store without the owner index wrote them (an upgrade)."""
    root.mkdir(parents=True, mode=0o700)
    for addr, (cid, ifname) in records.items():
        (root / addr).write_text(json.dumps({"containerID": cid, "ifname": ifname, "created": 1}))


def test_index_is_built_for_a_store_written_before_it(root: Path) -> None:
    _old_style_store(root, {str(A1): ("c1", "eth0"), str(A2): ("c2", "eth0")})
    (root / ".owners-build-7-abc").mkdir()  # a build a killed process left behind
    (root / ".owners-build-7-abc" / "junk").write_text("x")
    store = AllocationStore(root)
    assert store.find_by_owner("c2", "eth0") == A2
    assert sorted(os.listdir(root / OWNERS_DIR)).__len__() == 2
    assert not [n for n in os.listdir(root) if n.startswith(".owners-build-")]
    assert store.release_by_owner("c1", "eth0") == [A1]
    assert [r.addr for r in store.records()] == [A2]


def test_release_by_owner_reads_one_record_not_all(store: AllocationStore, monkeypatch) -> None:
    for i in range(200):
        assert store.reserve(IPAddress("10.244.3.10") + i, f"c{i}", "eth0")
    reads: list[IPAddress] = []
    real = AllocationStore._read_record

    def counting(self, addr):
        reads.append(addr)
        return real(self, addr)

    monkeypatch.setattr(AllocationStore, "_read_record", counting)
    assert store.release_by_owner("c150", "eth0") == [IPAddress("10.244.3.160")]
    assert store.release_by_owner("never-added", "eth0") == []
    assert store.find_by_owner("c7", "eth0") == IPAddress("10.244.3.17")
    assert len(reads) == 2, reads  # one for the DEL, none for the stranger, one for the lookup


def test_stale_index_entry_never_releases_another_owners_address(store: AllocationStore, root: Path) -> None:
    assert store.reserve(A1, "c1", "eth0")
    assert store.release(A1)
    assert store.reserve(A1, "c2", "eth0")
    # A killed writer left c1's entry pointing at A1, which c2 holds now.
    from cni_fan.ipam.store import _owner_key
    os.symlink(str(A1), root / OWNERS_DIR / _owner_key("c1", "eth0"))
    assert store.find_by_owner("c1", "eth0") is None
    assert store.release_by_owner("c1", "eth0") == []
    assert store.find_by_owner("c2", "eth0") == A1
    assert store.reserve(A2, "c1", "eth0")
    assert store.find_by_owner("c1", "eth0") == A2


def test_failed_reserve_restores_the_owners_entry(store: AllocationStore) -> None:
    assert store.reserve(A1, "c1", "eth0")
    assert store.reserve(A2, "c2", "eth0")
    assert not store.reserve(A2, "c1", "eth0")  # taken: c1 still holds A1 and finds it
    assert store.find_by_owner("c1", "eth0") == A1
    assert not store.reserve(A1, "c3", "eth0")
    assert store.find_by_owner("c3", "eth0") is None


def test_gc_sweeps_index_entries_that_point_nowhere(store: AllocationStore, root: Path) -> None:
    from cni_fan.ipam.store import _owner_key
    assert store.reserve(A1, "c1", "eth0")
    assert store.reserve(A2, "c2", "eth0")
    os.symlink(str(A3), root / OWNERS_DIR / _owner_key("gone", "eth0"))  # dangling
    (root / OWNERS_DIR / ".tmp-1-ff").symlink_to(str(A3))
    stale, corrupt = store.gc({("c1", "eth0")})
    assert (stale, corrupt) == ([A2], [])
    assert [os.readlink(root / OWNERS_DIR / n) for n in os.listdir(root / OWNERS_DIR)] == [str(A1)]
    assert store.find_by_owner("c1", "eth0") == A1


def test_owner_key_separates_values_that_concatenate_alike() -> None:
    from cni_fan.ipam.store import _owner_key
    assert _owner_key("a\x00b", "c") != _owner_key("a", "b\x00c")
    assert _owner_key("ab", "c") != _owner_key("a", "bc")


@pytest.mark.parametrize("name", ["10.244.3.2", "0.0.0.0", "255.255.255.255", "1.2.3.4"])
def test_record_names_parse(name: str) -> None:
    from cni_fan.ipam.store import _address_from_name
    assert _address_from_name(name) == IPAddress(name)


@pytest.mark.parametrize("name", ["010.244.3.2", "10.244.3", "1.2.3.4.5", "256.1.1.1", "1.2.3.4 ", " 1.2.3.4",
                                  "1.2.3.4\n", "١.2.3.4", "1.2.3.+4", "1..3.4", "", "owners", "lock", "0x1.2.3.4"])
def test_other_names_are_not_records(name: str) -> None:
    from cni_fan.ipam.store import _address_from_name
    assert _address_from_name(name) is None


def test_record_name_parser_agrees_with_netaddr_canonical_form() -> None:
    """Property: a name is a record name exactly when netaddr's canonical form gives it back."""
    from hypothesis import given, settings, strategies as st
    from netaddr import AddrFormatError
    from cni_fan.ipam.store import _address_from_name

    def reference(name: str):
        try:
            addr = IPAddress(name, 4)
        except (AddrFormatError, ValueError):
            return None
        return addr if str(addr) == name else None

    octet = st.one_of(st.integers(0, 300).map(str), st.text("0123456789", min_size=1, max_size=4))
    dotted = st.lists(octet, min_size=1, max_size=5).map(".".join)

    @settings(max_examples=2000, deadline=None)
    @given(st.one_of(dotted, st.text(max_size=20), st.ip_addresses(v=4).map(str)))
    def agree(name: str) -> None:
        assert _address_from_name(name) == reference(name), name

    agree()


# -- IPv6 stores (IPv6-only networks) -------------------------------------------

B1 = IPAddress("fd50:0:0:1c::2")
B2 = IPAddress("fd50:0:0:1c::3")
B3 = IPAddress("fd50:0:0:1c::ffff:0:4")


@pytest.fixture
def store6(root: Path) -> AllocationStore:
    return AllocationStore(root, version=6)


def test_ipv6_records_are_named_canonically(store6: AllocationStore, root: Path) -> None:
    assert store6.reserve(B1, "c1", "eth0")
    assert store6.reserve(B3, "c3", "eth0")
    store6.set_last_reserved(B3)
    assert sorted(os.listdir(root)) == sorted(["fd50:0:0:1c::2", "fd50::1c:0:ffff:0:4", LOCK_NAME,
                                               LAST_RESERVED_NAME, OWNERS_DIR])
    assert (root / LAST_RESERVED_NAME).read_text() == "fd50::1c:0:ffff:0:4\n"
    assert sorted(os.readlink(root / OWNERS_DIR / n) for n in os.listdir(root / OWNERS_DIR)) == [
        "fd50:0:0:1c::2", "fd50::1c:0:ffff:0:4"]
    assert mode(root / "fd50:0:0:1c::2") == 0o600
    assert store6.last_reserved() == B3
    assert store6.taken() == {B1, B3}


def test_ipv4_mapped_address_is_named_in_hex_not_dotted(store6: AllocationStore, root: Path) -> None:
    """netaddr prints `::ffff:10.0.0.1`; the record is `::ffff:a00:1`, the one name the store reads back."""
    mapped = IPAddress("::ffff:10.0.0.1")
    assert store6.reserve(mapped, "c1", "eth0")
    assert "::ffff:a00:1" in os.listdir(root)
    assert store6.taken() == {mapped} and store6.find_by_owner("c1", "eth0") == mapped
    assert not store6.reserve(mapped, "c2", "eth0")


def test_ipv6_store_operations(store6: AllocationStore) -> None:
    assert store6.reserve(B1, "c1", "eth0")
    assert not store6.reserve(B1, "c2", "eth0")
    assert store6.reserve(B2, "c2", "eth0")
    assert store6.find_by_owner("c2", "eth0") == B2
    assert [r.addr for r in store6.records()] == [B1, B2]
    assert store6.release_by_owner("c1", "eth0") == [B1]
    assert not store6.release(B1)
    assert store6.reserve(B3, "gone", "eth0")
    assert store6.gc({("c2", "eth0")}) == ([B3], [])
    assert store6.taken() == {B2}


def test_ipv6_corrupt_records_and_temp_files(store6: AllocationStore, root: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    (root / "fd50:0:0:1c::2").write_bytes(b"{")
    (root / ".tmp-999-deadbeef").write_text('{"containerID": "c1", "ifname": "eth0", "created": 1}')
    with caplog.at_level(logging.WARNING, logger="cni_fan.ipam"):
        assert store6.corrupt_addresses() == [B1]
    assert "fd50:0:0:1c::2" in caplog.text
    assert store6.taken() == {B1} and not store6.reserve(B1, "c3", "eth0")
    assert store6.sweep_temp_files() == [".tmp-999-deadbeef"]
    assert store6.gc(set()) == ([], [B1])


def test_ipv6_owner_index_is_built_for_an_old_store(root: Path) -> None:
    _old_style_store(root, {"fd50:0:0:1c::2": ("c1", "eth0"), "fd50:0:0:1c::3": ("c2", "eth0")})
    store6 = AllocationStore(root, version=6)
    assert store6.find_by_owner("c2", "eth0") == B2
    assert len(os.listdir(root / OWNERS_DIR)) == 2


def test_a_store_reads_only_its_own_family(root: Path) -> None:
    """An IPv4 store written before IPv6 existed reads as before; the families never mix."""
    _old_style_store(root, {"10.244.3.2": ("c4", "eth0"), "fd50:0:0:1c::2": ("c6", "eth0")})
    (root / LAST_RESERVED_NAME).write_text("10.244.3.2\n")
    store4, store6 = AllocationStore(root), AllocationStore(root, version=6)
    assert store4.version == 4 and store4.taken() == {A1} and store4.last_reserved() == A1
    assert store6.taken() == {B1} and store6.last_reserved() is None
    with pytest.raises(ValueError, match="not an IPv6 address"):
        store6.reserve(A1, "c", "eth0")
    with pytest.raises(ValueError, match="not an IPv4 address"):
        store4.release(B1)
    with pytest.raises(ValueError):
        AllocationStore(root, version=5)


def test_ipv6_foreign_spellings_are_not_records(store6: AllocationStore, root: Path) -> None:
    """Another spelling of a taken address is a foreign file: it neither blocks nor duplicates it."""
    assert store6.reserve(B1, "c1", "eth0")
    for name in ("FD50:0:0:1C::2", "fd50::1c:0:0:0:2", "fd50:0:0:1c:0:0:0:2", "fd50:0000:0:1c::2",
                 "::ffff:10.0.0.1", "fe80::1%u0", "10.244.3.2", "notes.txt"):
        (root / name).write_text("{}")
    assert store6.taken() == {B1} and store6.corrupt_addresses() == []
    assert [r.container_id for r in store6.records()] == ["c1"]


@pytest.mark.parametrize("name", ["::", "::1", "fd50:0:0:1c::5", "fd50::1c:0:ffff:0:4", "1:0:0:1::1",
                                  "1::1:0:0:1:1", "1:2:3:4:5:6:7:0", "0:1:2:3:4:5:6:0", "0:2:3:4:5:6:7:8",
                                  "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:a00:1", "fd00:198:18::1c"])
def test_ipv6_record_names_parse(name: str) -> None:
    from cni_fan.ipam.store import _address_from_name
    assert _address_from_name(name, 6) == IPAddress(name)


@pytest.mark.parametrize("name", ["FD50::5", "fd50::05", "fd50:0:0:1c:0:0:0:5", "fd50::1c:0:0:0:5",
                                  "1:0:0:1:0:0:0:1", "1::1:0:0:0:1", "1:0:0:1::1:1", "1:2:3:4:5:6:7::",
                                  "::1:2:3:4:5:6:7", "0:0::1", "0:1:2:3:4:5:6::", "::2:3:4:5:6:7:8", ":::", "::1::", ":1::", "1::2:", "fd50:::5",
                                  "::ffff:10.0.0.1", "::10.0.0.1", "fe80::1%eth0", "fd50::5/64", " ::1",
                                  "::1\n", "1:2:3:4:5:6:7:8:9", "12345::", "g::", "", ":", "fd50::5.tmp",
                                  "0000::", "::0", "10.244.3.2"])
def test_other_ipv6_names_are_not_records(name: str) -> None:
    from cni_fan.ipam.store import _address_from_name
    assert _address_from_name(name, 6) is None


def test_ipv6_names_agree_with_the_ipaddress_module() -> None:
    """Properties: every address has one name, the parser gives it back, and it is RFC 5952's text
    (the ipaddress module's, apart from the dotted tail some versions print for IPv4-mapped ones)."""
    import ipaddress

    from hypothesis import given, settings, strategies as st
    from cni_fan.ipam.names import ipv6_name
    from cni_fan.ipam.store import _address_from_name

    def reference(name: str):
        try:
            addr = ipaddress.IPv6Address(name)
        except ValueError:
            return None
        return IPAddress(int(addr), 6) if ipv6_name(int(addr)) == name else None

    group = st.one_of(st.just("0"), st.just("00"), st.integers(0, 0xFFFF).map("{:x}".format),
                      st.integers(0, 0xFFFF).map("{:X}".format), st.text("0123456789abcdef", max_size=5))
    spelled = st.lists(group, min_size=1, max_size=9).map(":".join) | st.builds(
        lambda a, b: a + "::" + b, st.lists(group, max_size=7).map(":".join), st.lists(group, max_size=7).map(":".join))
    sparse = st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF]), min_size=8, max_size=8).map(
        lambda gs: sum(g << (112 - 16 * i) for i, g in enumerate(gs)))
    values = st.integers(0, 2**128 - 1) | sparse

    @settings(max_examples=3000, deadline=None)
    @given(values)
    def one_name(value: int) -> None:
        name = ipv6_name(value)
        assert _address_from_name(name, 6) == IPAddress(value, 6)
        if value >> 32 != 0xFFFF:
            assert name == str(ipaddress.IPv6Address(value))

    @settings(max_examples=3000, deadline=None)
    @given(spelled | st.text(max_size=12) | values.map(lambda v: str(ipaddress.IPv6Address(v))))
    def agree(name: str) -> None:
        assert _address_from_name(name, 6) == reference(name), name

    one_name()
    agree()

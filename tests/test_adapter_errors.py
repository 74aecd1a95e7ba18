"""Adapters raise their own exceptions; the verbs report them with the CNI codes of before.

The table in cni_fan/adapter_errors.py is the contract: a runtime (and
docs/configuration.md) knows these codes, so each kind keeps its code and
its message passes through unchanged.
"""
from __future__ import annotations

import os

import pytest

from cni_fan.adapter_errors import as_cni_error, reporting_adapter_errors, verb_table
from cni_fan.cni.errors import (CniError, INVALID_CONFIG, INVALID_ENVIRONMENT, IO_FAILURE, POOL_FULL,
                                TRY_AGAIN_LATER, UNKNOWN_CONTAINER)
from cni_fan.net import errors
from harness.netlab import Netns


@pytest.mark.parametrize("error, code", [
    (errors.NetnsMissing("network namespace /x does not exist"), UNKNOWN_CONTAINER),
    (errors.NetnsError("cannot open network namespace /x", "Permission denied"), INVALID_ENVIRONMENT),
    (errors.LinkConflict("interface 'u1' exists and is not a bridge", "it is a veth"), INVALID_CONFIG),
    (errors.LinkError("failed to create bridge 'fan-x'", "Operation not permitted"), IO_FAILURE),
    (errors.UnderlayMissing("no address in the underlay network 198.18.0.0/16 on this node"), TRY_AGAIN_LATER),
    (errors.UnderlayAmbiguous("several addresses in the underlay network 198.18.0.0/15 on this node"),
     INVALID_CONFIG),
    (errors.GuardError("port guard: setting up the bridge port failed", "No such device"), IO_FAILURE),
    (errors.TcError("tc: attaching cni-fan on ifindex 3 failed", "Invalid argument"), IO_FAILURE),
])
def test_each_adapter_error_keeps_its_code_and_message(error: errors.NetError, code: int) -> None:
    cni = as_cni_error(error)
    assert (cni.code, cni.msg, cni.details) == (code, error.msg, error.details)
    assert str(cni) == str(error)


def test_a_verb_table_reports_adapter_errors_and_leaves_the_rest_alone() -> None:
    def add(_req):
        raise errors.UnderlayMissing("underlayInterface 'u9' does not exist on this node", subject="u9")

    def status(_req):
        raise CniError(POOL_FULL, "no free address")

    def check(_req):
        raise ValueError("a bug")

    verbs = verb_table({"ADD": add, "STATUS": status, "CHECK": check})
    with pytest.raises(CniError) as info:
        verbs["ADD"](None)
    assert (info.value.code, info.value.msg) == (TRY_AGAIN_LATER, "underlayInterface 'u9' does not exist on this node")
    with pytest.raises(CniError) as info:
        verbs["STATUS"](None)
    assert info.value.code == POOL_FULL
    with pytest.raises(ValueError):
        verbs["CHECK"](None)
    assert reporting_adapter_errors(add).__name__ == "add"


@pytest.mark.kernel
def test_a_bridge_name_taken_by_another_kind_of_link_is_a_config_error() -> None:
    """links.ensure_bridge raises LinkConflict; through a verb it is INVALID_CONFIG, as before."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    from cni_fan.net import links
    from cni_fan.net.netns import rtnl_in

    ns = Netns("err")
    try:
        ns.ip("link", "add", "fanbr0", "type", "veth", "peer", "name", "x1")
        with rtnl_in(ns.path, {}) as sock:
            with pytest.raises(errors.LinkConflict) as info:
                links.ensure_bridge(sock, "fanbr0", [("241.1.10.1", 24)], 1450)
            assert info.value.subject == "fanbr0"
            with pytest.raises(CniError) as reported:
                reporting_adapter_errors(links.ensure_bridge)(sock, "fanbr0", [("241.1.10.1", 24)], 1450)
        assert reported.value.code == INVALID_CONFIG
        assert reported.value.msg == "interface 'fanbr0' exists and is not a bridge"
        assert reported.value.details.startswith("it is a veth;")
    finally:
        ns.delete()

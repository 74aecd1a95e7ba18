"""Which path pod traffic takes, seen on the wire (issue 12).

While `lab check` pings every pod from every pod, an AF_PACKET socket on
every node's underlay interface keeps what the node sends; afterwards each
frame is classified (cni_fan.lab.wireframes) and every pod pair on two
different nodes gets a verdict: the path seen for its packets (direct or
encapsulated) against the one expected (direct iff direct routing is on
and both nodes share a segment, cni_fan.lab.segments). Per pod pair: the
pings are the check's own, so watching them costs no extra probe. A
direct pair's first packets may go encapsulated while the sender's kernel
learns the peer's MAC (the program's fallback): a pair that only did that
is pinged once more, and passes when its packets go direct from then on.
"""
from __future__ import annotations

import errno
import socket

from cni_fan.lab import netns
from cni_fan.lab.segments import expected_path
from cni_fan.lab.topology import NODE_UNDERLAY_IF, LabSpec, Node
from cni_fan.lab.wireframes import DIRECT, classify, in_order, path_ok

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
CAPTURE_BUFFER = 8 << 20   # every node's share of the check's pings, kept until read
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

Seen = dict[tuple[str, str], list[str]]   # (overlay source, destination) -> paths seen, in order


class PathWatch:
    """Sockets on the nodes' underlay interfaces, opened before the pings and read after them."""

    def __init__(self, nodes: tuple[Node, ...], vxlan_port: int = 4789) -> None:
        self.nodes = nodes
        self.vxlan_port = vxlan_port
        self.sockets: dict[str, socket.socket] = {}

    def __enter__(self) -> "PathWatch":
        try:
            for node in self.nodes:
                with netns.entered(node.netns):
                    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                self.sockets[node.short] = sock
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
                sock.bind((NODE_UNDERLAY_IF, 0))
                sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    def seen(self, into: dict[str, Seen] | None = None) -> dict[str, Seen]:
        """Per node: the overlay pairs its underlay interface sent since the last call, and how,
        in order (appended to `into`, what an earlier call returned, when given)."""
        seen = into if into is not None else {}
        for name, sock in self.sockets.items():
            self._read(sock, seen.setdefault(name, {}))
        return seen

    def _read(self, sock: socket.socket, seen: Seen) -> None:
        while True:
            try:
                frame, address = sock.recvfrom(65535)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return
                raise
            if address[2] != PACKET_OUTGOING:
                continue
            carried = classify(frame, self.vxlan_port)
            if carried is not None:
                seen.setdefault((carried.src, carried.dst), []).append(carried.path)


def path_verdicts(spec: LabSpec, pods: list, seen: dict[str, Seen]) -> dict[str, dict]:
    """Every pod pair on two nodes: {"n1p1 -> n2p1": {expected, seen (the paths in order), ok}};
    `pods` are the check's endpoints (name, address, node), `seen` what PathWatch.seen returned."""
    segment = {n.short: n.segment for n in spec.all_nodes}
    verdicts = {}
    for src in pods:
        for dst in pods:
            if src.node == dst.node or not src.address or not dst.address:
                continue
            expected = expected_path(spec.direct_routing, segment[src.node], segment[dst.node])
            paths = in_order(seen.get(src.node, {}).get((src.address, dst.address), []))
            verdicts[f"{src.name} -> {dst.name}"] = {"expected": expected, "seen": paths,
                                                     "ok": path_ok(expected, paths)}
    return verdicts


def unsettled(verdicts: dict[str, dict], pods: list) -> list[tuple[str, str]]:
    """(namespace, address) to ping again: pairs expected direct whose packets have not gone
    direct yet (all of them took the fallback while the peer's MAC was being learnt)."""
    by_name = {p.name: p for p in pods}
    again = []
    for pair, verdict in verdicts.items():
        if verdict["expected"] == DIRECT and DIRECT not in verdict["seen"]:
            src, dst = (by_name[name] for name in pair.split(" -> "))
            again.append((src.netns, dst.address))
    return again

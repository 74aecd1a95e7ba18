"""iproute2's JSON (`ip -j`, `bridge -j`), read with one fix-up.

iproute2 prints `"encap":"ip", ..., "dst":"<underlay>"` after a route's
own "dst": the second key is renamed `encap_dst` before a plain (fast)
json.loads, which would otherwise keep only the last of the two.
"""
from __future__ import annotations

import json
import re
import subprocess

from cni_fan.lab.errors import LabError
from cni_fan.lab.processes import find_tool

IP_JSON_TIMEOUT = 120.0
_ENCAP_DST = re.compile(r'("encap":"[^"]*"[^{}\[\]]*?)"dst":')


def parse_ip_json(text: str) -> list[dict]:
    """The output of `ip -j` / `bridge -j` as a list of objects; an encap
    destination becomes `encap_dst`."""
    text = text.strip()
    if not text:
        return []
    return json.loads(_ENCAP_DST.sub(r'\1"encap_dst":', text))


def ip_json(ns: str, *args: str, tool: str = "ip") -> list[dict]:
    """`ip -j -n ns ...` (or `bridge`), parsed; nexthop objects read as none
    where the kernel or iproute2 has none."""
    proc = subprocess.run([find_tool(tool), "-j", "-n", ns, *args], capture_output=True, text=True,
                          timeout=IP_JSON_TIMEOUT)
    if proc.returncode != 0:
        if "nexthop" in args:  # an old kernel or iproute2 without nexthop objects
            return []
        raise LabError(f"{tool} -n {ns} {' '.join(args)}: {proc.stderr.strip()}")
    return parse_ip_json(proc.stdout)

"""STATUS's readiness probe (`cni_fan.readiness`) stays small: a CNI call
loads none of the node agent, its firewall, sysctls or program loader.
(Its answers are tested on a real node in test_node_datapath.py.)"""
from __future__ import annotations

import subprocess
import sys

# The components the probe asks; anything else of cni_fan.node is the agent's.
PROBE_ASKS = {"cni_fan.node", "cni_fan.node.tunnel", "cni_fan.node.route", "cni_fan.node.fanmap_routes"}


def test_the_plugin_and_its_status_probe_import_only_the_components_they_ask() -> None:
    code = ("import sys, cni_fan.plugin, cni_fan.ipam.plugin, cni_fan.readiness; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('cni_fan.node', 'cni_fan.lab', "
            "'cni_fan.commands')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert set(out.stdout.split()) == PROBE_ASKS


def test_the_other_verbs_do_not_load_the_probe() -> None:
    code = "import sys, cni_fan.plugin; print('cni_fan.readiness' in sys.modules, 'cni_fan.node' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]

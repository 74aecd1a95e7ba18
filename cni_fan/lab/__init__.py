"""The lab: emulated nodes in network namespaces on one machine.

One job per module:

- `topology`: what a lab is (names, addresses, conflists); pure.
- `netns`: namespaces, veths and the underlay bridge (pyroute2).
- `processes`: how the lab runs commands in namespaces and stops processes.
- `state`: lab.json, what `up` built.
- `agents`: the node agent in each node (start, /healthz, `node show`, `node down`).
- `pods`: the `fan` plugin called as a runtime calls it.
- `icmp` (pure) and `probes`: ICMP echo from inside namespaces, reusable.
- `nat`: the masquerade probe towards ext.
- `ipjson` and `audit`: iproute2's JSON, and the per-peer state audit.
- `report`: the text `lab up` and `lab check` print.
- `run`: the verbs `up`, `check`, `down`, reading top to bottom.

The CLI is `cni-fan lab up|check|down` (cni_fan/commands/lab.py).
"""

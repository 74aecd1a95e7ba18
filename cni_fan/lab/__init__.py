"""The lab: emulated nodes in network namespaces on one machine.

`topology` says what a lab is (names, addresses, conflists; pure),
`netns` builds and removes namespaces, veths and the underlay bridge,
`run` brings a lab up, checks it and tears it down. The CLI is
`cni-fan lab up|check|down` (cni_fan/commands/lab.py).
"""

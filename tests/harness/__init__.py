"""The tests' one harness: every lab, pinger and diff the tests share.

Test modules import from here and never from each other; fixtures stay in
tests/conftest.py (or, for one module's own lab, in that module, built
from a harness factory such as `nodelab.lab_fixture` or `podlab.module_lab`).

    system    paths of the programs under test, BASE_ENV, `run`, `inside`
              (this thread in a namespace), `in_netns`, the root check
    netlab    namespaces (`Netns`), a fake node, configs, the plugin called
              as a runtime does (`run_plugin`, `cnitool`), the plugin server
    nodelab   a Fan cluster: nodes on an underlay switch, `node up`, pods by
              cnitool, agents, a router and an outside host
    podlab    one node with the plugin server and many pods by raw calls
              (port guard, CHECK, scale, fuzz)
    guard6lab a fan bridge with dual-stack pods and the port guard
              installed directly (the plugin has no IPv6 pods yet)
    bpflab    the datapath built by hand, the program attached directly
    bpflab6u  the same for an IPv6-only cluster (VXLAN over an IPv6 underlay)
    kubelet   a node running a DaemonSet's containers as a kubelet would
    image     deploy/Containerfile replayed into a directory
    bundle    the PyInstaller bundle, built when missing or stale
    clients   the two thin clients (native fan-client, cni_fan.entry) behind one call
    ping      ping(8) argv, a running pinger, one raw echo with DF and TTL
    ping6     one raw ICMPv6 echo with a hop limit, unfragmented, and its watcher
    frames    crafted frames, the Internet checksum, packet and ICMP sockets
    frames6   crafted IPv6 frames: ND, RA, redirects, DHCPv6, extension headers
    traffic   a who-answered server and its client, for the Services and policy tests
    state     state diffs, the plugin's files and records on disk
    fanmaps   random valid FanMaps of either overlay family (Hypothesis)
    benchrun  one benchmark run for real, for the benchmarks' smoke tests

Markers (pyproject.toml): `kernel` (root, namespaces) and `build` (the
bundle); `make unit` runs neither, conftest.py refuses a test that uses a
kernel lab or the bundle without its marker.
"""

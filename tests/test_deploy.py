"""deploy/: the manifests, offline, and their commands run on a lab node.

No cluster runs here. The manifests are validated against the Kubernetes
OpenAPI schemas that kubernetes-validate ships (strict: unknown fields
fail), for the oldest and the newest version we support. Then the
DaemonSet's own commands, read from the YAML, run the way a kubelet would
run them on a node: in a network namespace with an underlay veth
(198.18.1.10/16), each container in a mount namespace of its own with a
read-only /proc/sys (as runc makes it) and only the capabilities the YAML
grants (setpriv), each hostPath mapped to a temporary directory and each
mount path rewritten to it, the ConfigMap's conflist written where its
volume would be (harness/kubelet.py). The binaries are the PyInstaller
bundle (built if missing: the `bundle` fixture, harness/bundle.py), placed
as deploy/Containerfile places it (harness/image.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from cni_fan.node.conf import parse_conflist
from harness import image
from harness.kubelet import LabNode
from harness.system import CAP_BITS, REPO, effective_caps, require_kernel_lab

DEPLOY = REPO / "deploy"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # 1.30: first with securityContext.appArmorProfile; 1.37: newest shipped
AGENT_CAPS = {"NET_ADMIN", "NET_RAW", "BPF"}  # no SYS_ADMIN: the plugin server never calls setns(2)
HOST_PATHS = {"/opt/cni/bin", "/etc/cni/net.d", "/run/cni-fan", "/run/xtables.lock", "/proc/sys/net"}
UNDERLAY = "198.18.1.10/16"
SLICE_GATEWAY = "250.1.10.1"  # 198.18.1.10 in 198.18.0.0/16 under 250.0.0.0/8


def manifests() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*/*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(kind: str, name: str) -> dict[str, Any]:
    for path in manifests():
        for doc in documents(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/")


def pod_containers(ds: dict) -> list[dict]:
    spec = ds["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def container(ds: dict, name: str) -> dict:
    return next(c for c in pod_containers(ds) if c["name"] == name)


# -- offline checks ----------------------------------------------------------------

def test_every_manifest_validates_offline() -> None:
    import kubernetes_validate

    docs = [(p, d) for p in manifests() for d in documents(p)]
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ConfigMap", "DaemonSet"}
    for path, doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.relative_to(REPO)}: {doc['kind']} {doc['metadata']['name']} "
                            f"is not valid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_no_rbac_and_no_api_token() -> None:
    kinds = {d["kind"] for p in manifests() for d in documents(p)}
    assert not kinds & {"ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    for path in manifests():
        for doc in documents(path):
            if doc["kind"] == "DaemonSet":
                assert doc["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_agent_daemonset_policy() -> None:
    ds = find("DaemonSet", "cni-fan")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert [c["name"] for c in spec["initContainers"]] == ["install-plugins"]
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    images = {c["image"] for c in pod_containers(ds)}
    assert len(images) == 1, f"one image for every container: {images}"
    for c in pod_containers(ds):
        sc = c["securityContext"]
        assert not sc.get("privileged", False) and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert set(c["resources"]["requests"]) == {"cpu", "memory"} == set(c["resources"]["limits"])
    assert "add" not in container(ds, "install-plugins")["securityContext"]["capabilities"]
    assert set(container(ds, "agent")["securityContext"]["capabilities"]["add"]) == AGENT_CAPS
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == HOST_PATHS, "exactly these host paths (no /sys/fs/bpf: the program is not pinned)"


def install_doc_section(heading: str) -> str:
    """The text of docs/install.md under `heading`, up to the next heading of any level."""
    text = (REPO / "docs" / "install.md").read_text()
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(r"^#+ ", text[start:], re.M)
    return text[start:start + following.start()] if following else text[start:]


def test_added_capabilities_are_the_ones_docs_install_md_explains() -> None:
    """The agent adds exactly the capabilities docs/install.md's table lists, each
    with its reason; the cleanup DaemonSet adds none beyond them."""
    section = install_doc_section("### What the agent is allowed to do")
    table = dict(re.findall(r"^\| `([A-Z_]+)` \| (.+?) \|$", section, re.M))
    assert table and all(len(why.strip()) > 10 for why in table.values()), table
    agent = container(find("DaemonSet", "cni-fan"), "agent")
    assert set(agent["securityContext"]["capabilities"]["add"]) == set(table)
    cleanup_ds = find("DaemonSet", "cni-fan-cleanup")
    for c in pod_containers(cleanup_ds):
        added = set(c["securityContext"]["capabilities"].get("add", []))
        assert added <= set(table), f"{c['name']} adds {added - set(table)}, which docs/install.md does not explain"


def test_host_paths_are_the_ones_docs_install_md_lists() -> None:
    """"Host paths, and nothing else": the same set in the agent's DaemonSet, each
    "X at Y" mounted at Y, and none of the paths the docs rule out."""
    section = install_doc_section("### What the agent is allowed to do")
    paragraph = section[section.index("Host paths, and nothing else"):].split("\n\n")[0]
    listed, ruled_out = paragraph.split(". No ", 1)
    mounted_at = dict(re.findall(r"`(/[^`]+)`\s+at\s+`(/[^`]+)`", listed))
    documented = set(re.findall(r"`(/[^`]+)`", listed)) - set(mounted_at.values())
    ds = find("DaemonSet", "cni-fan")
    spec = ds["spec"]["template"]["spec"]
    host_path = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(host_path.values()) == documented
    assert not set(re.findall(r"`(/[^`]+)`", ruled_out)) & set(host_path.values())
    mounts = {(host_path[m["name"]], m["mountPath"]) for c in pod_containers(ds) for m in c.get("volumeMounts", [])
              if m["name"] in host_path}
    for path, mount in mounted_at.items():
        assert (path, mount) in mounts, f"docs/install.md: {path} at {mount}; the DaemonSet: {sorted(mounts)}"


def test_probes_hit_the_agents_health_endpoint() -> None:
    agent = container(find("DaemonSet", "cni-fan"), "agent")
    conf = parse_conflist(json.loads(find("ConfigMap", "cni-fan-config")["data"]["10-fan.conflist"]))
    for probe in ("readinessProbe", "livenessProbe"):
        get = agent[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (conf.fan.metrics_address, conf.fan.metrics_port,
                                                         "/healthz")


def test_configmap_is_the_repositorys_conflist_and_agent_paths_match() -> None:
    text = find("ConfigMap", "cni-fan-config")["data"]["10-fan.conflist"]
    conf = parse_conflist(json.loads(text))
    assert json.loads(text) == json.loads((REPO / "conf" / "10-fan.conflist").read_text())
    ds = find("DaemonSet", "cni-fan")
    agent = container(ds, "agent")
    command = agent["command"]
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    conflist = command[command.index("--conflist") + 1]
    assert volumes[mounts[str(Path(conflist).parent)]]["configMap"]["name"] == "cni-fan-config"
    # The fan on the host and the agent in the container name the same
    # files: dataDir (and the socket in it) is mounted at its host path.
    for path in (conf.fan.params.data_dir, str(Path(conf.fan.params.agent_socket).parent)):
        assert volumes[mounts[path]]["hostPath"]["path"] == path


# -- the image (deploy/Containerfile, replayed by harness/image.py) -------------------

# The programs the agent runs (cni_fan/node/firewall.py): nft, iptables-legacy on
# legacy nodes, and both iptables-save variants to find the host's backend.
FIREWALL_PROGRAMS = ("nft", "iptables-legacy", "iptables-legacy-save", "iptables-nft-save")
BASE_IMAGE_TOOLS = {"sh", "sleep"}  # dash and coreutils: in every Debian image


def daemonset_commands() -> list[list[str]]:
    return [c["command"] for name in ("cni-fan", "cni-fan-cleanup") for c in pod_containers(find("DaemonSet", name))]


def test_every_daemonset_command_is_found_in_the_image(tmp_path: Path) -> None:
    """The image's PATH finds each container's program: the base image's shell
    tools, or a link the Containerfile makes into what it copies."""
    context = {}
    for source, _ in image.copies():
        context[source] = tmp_path / "context" / source
        context[source].mkdir(parents=True)
        (context[source] / "cni-fan").write_text("#!/bin/sh\n")  # a stand-in for the build output's file
    root = image.assemble(tmp_path / "image", context)
    for command in daemonset_commands():
        if command[0] in BASE_IMAGE_TOOLS:
            continue
        found = image.resolve(command[0], root)
        assert found is not None and found.exists(), f"the image has no {command[0]} on its PATH"
        assert any(found.resolve().is_relative_to((root / dest.lstrip("/")).resolve()) for _, dest in image.copies())


def test_the_image_installs_the_programs_the_agent_runs() -> None:
    """Each firewall program the agent runs comes with a package the Containerfile
    installs (asked of this Debian machine's dpkg, which ships the same packages)."""
    if shutil.which("dpkg") is None:
        pytest.skip("no dpkg to say which package ships a program")
    packages = image.installed_packages()
    for program in FIREWALL_PROGRAMS:
        path = shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if path is None:
            pytest.skip(f"{program} is not installed here")
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True)
        assert owner.returncode == 0, owner.stderr
        assert owner.stdout.split(":")[0] in packages, f"{program} comes with {owner.stdout.strip()}, not in {packages}"


@pytest.mark.slow
@pytest.mark.build
def test_the_image_built_from_the_containerfile_runs_its_commands(bundle: Path, tmp_path: Path) -> None:
    """The build output placed as the Containerfile places it: its own RUN check
    and CMD pass, and each cni-fan command of the DaemonSets is one the
    program knows, with the options it accepts."""
    root = image.assemble(tmp_path / "image", {source: REPO / source for source, _ in image.copies()})
    env = image.image_env(root)
    checks = [words for words in image.run_commands() if image.resolve(words[0], root) is not None]
    cmd = [json.loads(args) for keyword, args in image.instructions() if keyword == "CMD"]
    assert checks and cmd
    for argv in [*[[w for w in words if not w.startswith(">")] for words in checks], *cmd]:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{argv}: {out.stderr}"
    for command in daemonset_commands():
        if command[0] != "cni-fan":
            continue
        words = command[:next((i for i, w in enumerate(command) if w.startswith("-")), len(command))]
        out = subprocess.run([*words, "--help"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{words}: {out.stderr}"
        for option in (w for w in command if w.startswith("--")):
            assert option in out.stdout, f"{' '.join(words)} does not take {option}"


# -- the commands on a lab node -----------------------------------------------------

@pytest.fixture
def lab(tmp_path: Path, bundle: Path) -> Iterator[LabNode]:
    require_kernel_lab(("unshare", "setpriv", "nft"), plugins=False)
    node = LabNode(tmp_path, bundle)
    try:
        yield node
    finally:
        node.cleanup()


def lab_conflist(node: LabNode) -> str:
    """The ConfigMap's conflist with this lab's underlay and its host paths."""
    raw = json.loads(find("ConfigMap", "cni-fan-config")["data"]["10-fan.conflist"])
    fan = next(p for p in raw["plugins"] if p["type"] == "fan")
    fan["underlay"] = "198.18.0.0/16"
    fan["dataDir"] = str(node.host("/run/cni-fan"))
    fan["agentSocket"] = str(node.host("/run/cni-fan") / "plugin.sock")
    return json.dumps(raw, indent=2) + "\n"


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout}s:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)


def datapath_up(node: LabNode) -> bool:
    routes = node.ip("-j", "route", "show", "250.0.0.0/8").stdout
    addrs = node.ip("-j", "-4", "addr", "show").stdout
    table = node.in_node("nft", "list", "table", "ip", "cni-fan")
    return bool(json.loads(routes or "[]")) and f'"{SLICE_GATEWAY}"' in addrs and table.returncode == 0


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.build
def test_daemonset_commands_on_a_lab_node(lab: LabNode) -> None:
    ds = find("DaemonSet", "cni-fan")
    conflist_text = lab_conflist(lab)
    files = {"cni-fan-config": {"10-fan.conflist": conflist_text}}

    # 1. The init container installs the plugins into the host's CNI bin dir.
    argv, env = lab.container_argv(ds, container(ds, "install-plugins"), files)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    bin_dir = lab.host("/opt/cni/bin")
    for plugin in ("fan", "fan-ipam"):
        assert (bin_dir / plugin).is_symlink() and os.access(bin_dir / plugin, os.X_OK)
        assert os.readlink(bin_dir / plugin).startswith(".cni-fan/")
        assert os.readlink(bin_dir / plugin).endswith("/fan-client")  # the image's bundle carries the native client

    # 2. The agent, on a node whose underlay address is not there yet: it
    #    cannot bring the node up, so it installs no conflist and is not ready.
    agent = container(ds, "agent")
    argv, env = lab.container_argv(ds, agent, files)
    log = lab.tmp / "agent.log"
    proc = lab.start(argv, env, log)
    installed = lab.host("/etc/cni/net.d") / "10-fan.conflist"
    probe = agent["readinessProbe"]["httpGet"]
    time.sleep(3)
    assert proc.poll() is None, log.read_text()
    assert not installed.exists(), "conflist installed before the node was up"
    assert lab.http_get(probe["host"], probe["port"], probe["path"]) != 200

    # 3. The address arrives: the node comes up, and only then the conflist.
    lab.ip("addr", "add", UNDERLAY, "dev", "u0")
    wait_for("conflist", installed.exists, 30, proc, log)
    assert datapath_up(lab), "the conflist was there before the datapath"
    assert installed.read_text() == conflist_text, "installed conflist differs from the ConfigMap's"
    parse_conflist(json.loads(installed.read_text()))
    wait_for("ready /healthz", lambda: lab.http_get(probe["host"], probe["port"], probe["path"]) == 200, 30,
             proc, log)
    live = agent["livenessProbe"]["httpGet"]
    assert lab.http_get(live["host"], live["port"], live["path"]) == 200

    # 4. A pod ADD as the runtime makes it: the installed fan, on the host,
    #    with the installed conflist's fan entry; the agent's plugin server
    #    (started from the bundle) does the work.
    raw = json.loads(installed.read_text())
    netconf = {"cniVersion": raw["cniVersion"], "name": raw["name"],
               **next(p for p in raw["plugins"] if p["type"] == "fan")}
    sock = Path(netconf["agentSocket"])
    wait_for("plugin server socket", sock.exists, 60, proc, log)
    pod = lab.add_netns(f"{lab.prefix}pod")
    cni_env = {**lab.env(), "CNI_CONTAINERID": "deploytest1", "CNI_NETNS": pod, "CNI_IFNAME": "eth0",
               "CNI_PATH": str(bin_dir)}
    client = subprocess.Popen(["nsenter", f"--net={lab.path}", str(bin_dir / "fan")],
                              env={**cni_env, "CNI_COMMAND": "ADD"}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = client.communicate(json.dumps(netconf).encode(), timeout=60)
    assert client.returncode == 0, stdout + stderr
    result = json.loads(stdout)
    address = result["ips"][0]["address"]
    assert address.startswith("250.1.10.") and address.endswith("/24"), result
    pod_addrs = subprocess.run(["ip", "-n", pod.rsplit("/", 1)[1], "-4", "-br", "addr", "show", "eth0"],
                               capture_output=True, text=True).stdout
    assert address in pod_addrs
    served_by = {int(pid) for pid in re.findall(rb"\[(\d+)\]", stderr)}
    assert served_by and client.pid not in served_by, f"the call did not go through the plugin server: {stderr!r}"
    ping = subprocess.run(["ip", "netns", "exec", pod.rsplit("/", 1)[1], "ping", "-c1", "-W2", SLICE_GATEWAY],
                          capture_output=True)
    assert ping.returncode == 0, "pod cannot reach its gateway"
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rss = rss_kib(proc.pid) + sum(rss_kib(int(p)) for p in children)
    print(f"agent + plugin server RSS: {rss // 1024} MiB", file=sys.stderr)
    # The agent and its plugin server hold the YAML's capabilities and no SYS_ADMIN: the pod's side of
    # the ADD above and the CHECK below went through the netlink socket the fan on the host passed.
    for pid in [proc.pid, *map(int, children)]:
        assert not effective_caps(pid) & (1 << CAP_BITS["SYS_ADMIN"]), f"pid {pid} holds SYS_ADMIN"
    check = subprocess.run(["nsenter", f"--net={lab.path}", str(bin_dir / "fan")],
                           env={**cni_env, "CNI_COMMAND": "CHECK"},
                           input=json.dumps({**netconf, "prevResult": result}).encode(), capture_output=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert b"runs the call itself" not in check.stderr + log.read_bytes()
    client = subprocess.Popen(["nsenter", f"--net={lab.path}", str(bin_dir / "fan")],
                              env={**cni_env, "CNI_COMMAND": "DEL"}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = client.communicate(json.dumps(netconf).encode(), timeout=60)
    assert client.returncode == 0, stdout + stderr
    served_by = {int(pid) for pid in re.findall(rb"\[(\d+)\]", stderr)}
    assert served_by and client.pid not in served_by, f"the DEL did not go through the plugin server: {stderr!r}"

    # 5. SIGTERM (a rollout): the agent goes, the datapath and conflist stay.
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert datapath_up(lab) and installed.exists()

    # 6. Uninstall: the cleanup DaemonSet's container, with the same image.
    cleanup_ds = find("DaemonSet", "cni-fan-cleanup")
    argv, env = lab.container_argv(cleanup_ds, container(cleanup_ds, "cleanup"), files)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not installed.exists()
    assert not [p.name for p in bin_dir.iterdir()], "plugins left in the CNI bin dir"
    assert not list(lab.host("/run/cni-fan").iterdir()), "state left in /run/cni-fan"
    assert not json.loads(lab.ip("-j", "route", "show", "250.0.0.0/8").stdout or "[]")
    assert SLICE_GATEWAY not in lab.ip("-4", "addr", "show").stdout
    assert lab.in_node("nft", "list", "table", "ip", "cni-fan").returncode != 0
    # Twice is harmless.
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.build
def test_agent_sets_sysctls_through_the_host_proc_mount(lab: LabNode) -> None:
    ds = find("DaemonSet", "cni-fan")
    files = {"cni-fan-config": {"10-fan.conflist": lab_conflist(lab)}}
    lab.ip("addr", "add", UNDERLAY, "dev", "u0")
    assert lab.in_node("sysctl", "-qw", "net.ipv4.ip_forward=0").returncode == 0
    argv, env = lab.container_argv(ds, container(ds, "agent"), files)
    log = lab.tmp / "agent.log"
    proc = lab.start(argv, env, log)
    wait_for("conflist", (lab.host("/etc/cni/net.d") / "10-fan.conflist").exists, 30, proc, log)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert "Read-only file system" not in log.read_text()
    assert lab.in_node("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == b"1"

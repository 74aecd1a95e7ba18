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
volume would be. The binaries are the PyInstaller bundle (built if
missing: the `bundle` fixture, harness/bundle.py).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
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

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # 1.30: first with securityContext.appArmorProfile; 1.37: newest shipped
AGENT_CAPS = {"NET_ADMIN", "NET_RAW", "BPF", "SYS_ADMIN"}
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


def test_each_added_capability_says_why() -> None:
    text = (DEPLOY / "daemonset.yaml").read_text() + (DEPLOY / "cleanup" / "cleanup.yaml").read_text()
    added = re.findall(r"^\s*- ([A-Z_]+)\s*(#.*)?$", text, re.M)
    assert {cap for cap, _ in added} >= AGENT_CAPS
    for cap, comment in added:
        assert len(comment) > 10, f"capability {cap} without a comment saying why"


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


def test_containerfile_ships_the_build_output_and_the_firewall_tools() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert re.search(r"^FROM debian:bookworm-slim$", text, re.M)
    assert re.search(r"^COPY dist/cni-fan/ /opt/cni-fan/$", text, re.M)
    assert re.search(r"install -y --no-install-recommends nftables iptables", text)
    assert "ln -s /opt/cni-fan/cni-fan /usr/local/bin/cni-fan" in text
    for ds in (find("DaemonSet", "cni-fan"), find("DaemonSet", "cni-fan-cleanup")):
        for c in pod_containers(ds):
            assert c["command"][0] in ("cni-fan", "sh", "sleep"), "commands the image has"


# -- the commands on a lab node -----------------------------------------------------

PREFIX = f"tdep-{secrets.token_hex(3)}-"


def need_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network and mount namespaces)")
    for tool in ("ip", "nsenter", "unshare", "setpriv", "nft", "ping"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run tools/setup.sh")


class LabNode:
    """A node: a network namespace with `u0` (its peer `u1` stays inside).
    Host paths live under `root`; containers run with `run_container`."""

    def __init__(self, tmp: Path, bundle: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "host"
        self.bundle = bundle
        self.netns = f"{PREFIX}node"
        self.path = f"/var/run/netns/{self.netns}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.add_netns(self.netns)
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", "u0", "type", "veth", "peer", "name", "u1")
        self.ip("link", "set", "u0", "up")
        self.ip("link", "set", "u1", "up")

    def add_netns(self, name: str) -> str:
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.namespaces.append(name)
        return f"/var/run/netns/{name}"

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "-n", self.netns, *args], capture_output=True, text=True, check=check)

    def host(self, path: str) -> Path:
        """Where a host path of the manifests is in this lab."""
        return self.root / path.lstrip("/")

    def env(self) -> dict[str, str]:
        # As in the image (deploy/Containerfile): the bundle elsewhere, and
        # a `cni-fan` symlink to it on the PATH.
        image_bin = self.tmp / "image-usr-local-bin"
        if not image_bin.exists():
            image_bin.mkdir()
            (image_bin / "cni-fan").symlink_to(self.bundle / "cni-fan")
        return {"PATH": f"{image_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8"}

    def container_argv(self, ds: dict, c: dict, files: dict[str, dict[str, str]]) -> tuple[list[str], dict]:
        """argv and env that run container `c` of `ds` here, as a kubelet would.

        `files`: ConfigMap name -> {key: content} (what its volume shows)."""
        volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
        rewrite: dict[str, str] = {}
        setup = ["set -e"]
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            if "hostPath" in v:
                host_path = v["hostPath"]["path"]
                if host_path == "/proc/sys/net":
                    # The node's own net sysctls, writable, beside the
                    # read-only /proc/sys (bound before /proc/sys goes read-only).
                    target = self.tmp / "proc-sys" / "net"
                    target.mkdir(parents=True, exist_ok=True)
                    setup.append(f"mount --bind /proc/sys/net {shlex.quote(str(target))}")
                    # CNI_FAN_PROC_SYS names the directory above the mount.
                    rewrite[str(Path(m["mountPath"]).parent)] = str(target.parent)
                else:
                    target = self.host(host_path)
                    if v["hostPath"]["type"] == "FileOrCreate":
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.touch()
                    else:
                        target.mkdir(parents=True, exist_ok=True)
            elif "configMap" in v:
                target = self.tmp / "configmap" / v["configMap"]["name"]
                target.mkdir(parents=True, exist_ok=True)
                for key, content in files[v["configMap"]["name"]].items():
                    (target / key).write_text(content)
            elif "emptyDir" in v:
                target = self.tmp / "emptydir" / f"{c['name']}-{v['name']}"
                target.mkdir(parents=True, exist_ok=True)
            else:
                raise AssertionError(f"volume kind of {v} is not emulated")
            rewrite[m["mountPath"]] = str(target)

        # One pass, longest mount path first; a path ends at "/" or at a
        # character no path name here has.
        pattern = re.compile("|".join(re.escape(p) for p in sorted(rewrite, key=len, reverse=True))
                             + r"(?![\w.-])")

        def fix(text: str) -> str:
            return pattern.sub(lambda m: rewrite[m.group(0)], text)

        argv = [fix(a) for a in c["command"] + c.get("args", [])]
        env = {**self.env(), **{e["name"]: fix(e["value"]) for e in c.get("env", [])}}
        caps = c["securityContext"]["capabilities"].get("add", [])
        capset = ",".join(["-all"] + [f"+{cap.lower()}" for cap in caps])
        setup += ["mount --bind /proc/sys /proc/sys", "mount -o remount,bind,ro /proc/sys",
                  f'exec setpriv --inh-caps={capset} --ambient-caps={capset} --bounding-set={capset} -- "$@"']
        return (["nsenter", f"--net={self.path}", "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", "\n".join(setup), "container", *argv], env)

    def start(self, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def in_node(self, *argv, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net={self.path}", *map(str, argv)], capture_output=True,
                              timeout=60, **kwargs)

    def http_get(self, host: str, port: int, path: str) -> int | None:
        """Status of GET http://host:port/path from the node's namespace (the kubelet's probe)."""
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=2); print(r.status)\n"
                "except urllib.error.HTTPError as e: print(e.code)\n"
                "except OSError: print('none')\n")
        out = self.in_node(sys.executable, "-c", code, f"http://{host}:{port}{path}", text=True)
        return None if out.stdout.strip() in ("none", "") else int(out.stdout.strip())

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def lab(tmp_path: Path, bundle: Path) -> Iterator[LabNode]:
    need_root_and_tools()
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
    pod = lab.add_netns(f"{PREFIX}pod")
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
    rss = rss_kib(proc.pid) + sum(rss_kib(int(p)) for p in
                                  subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                 text=True).stdout.split())
    print(f"agent + plugin server RSS: {rss // 1024} MiB", file=sys.stderr)
    out = subprocess.run(["nsenter", f"--net={lab.path}", str(bin_dir / "fan")], env={**cni_env, "CNI_COMMAND": "DEL"},
                         input=json.dumps(netconf).encode(), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr

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

"""Separate addresses for several test-cluster nodes on one machine: a network namespace per node, joined to this
host by a veth pair on a private bridge.

A node's daemon (and every job step it starts) enters the node's network namespace with `nsenter` and sees its own
hosts file, bind-mounted over /etc/hosts in a private mount namespace, that names every node and maps this
machine's hostname (which the nodes share) to the node itself: a rank's own hostname is its node's address, as on
real nodes. Not `ip netns exec`: it remounts /sys, hiding the cgroup mounts slurmd needs. Needs root.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Runs the rest of the command line with `hosts` over /etc/hosts, in the network namespace at `netns`; every
# step execs, so the daemon keeps the pid it was started with.
_ENTER = 'hosts=$1 netns=$2; shift 2; mount --bind "$hosts" /etc/hosts && exec nsenter --net="$netns" "$@"'


def unavailable() -> str | None:
    """Why namespaced nodes cannot run here, or None."""
    if os.geteuid() != 0:
        return "nodes in network namespaces need root"
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"nodes in network namespaces need {', '.join(missing)} (iproute2, util-linux)"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> str:
    """A 10.213.X.0/24 no interface of this host is on."""
    in_use = _ip("-4", "-o", "addr")
    for third in random.sample(range(1, 255), 254):
        if f" 10.213.{third}." not in in_use:
            return f"10.213.{third}"
    raise RuntimeError("no free 10.213.X.0/24 subnet for the test nodes")


@dataclass
class NodeNetwork:
    tag: str
    subnet: str
    nodes: dict[str, str]  # node name -> its address
    directory: Path  # the nodes' hosts files

    @property
    def bridge(self) -> str:
        return f"d3b{self.tag}"

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.1"

    def namespace(self, node: str) -> str:
        return f"d3dc-{self.tag}-{node}"

    def run_inside(self, node: str) -> list[str]:
        """The command prefix that runs a program on `node`."""
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _ENTER, "sh",
                str(self.directory / f"hosts-{node}"), f"/run/netns/{self.namespace(node)}"]

    @classmethod
    def create(cls, count: int, host: str, directory: Path) -> "NodeNetwork":
        tag = secrets.token_hex(2)
        subnet = _free_subnet()
        network = cls(tag, subnet, {f"d3dcn{i + 1}": f"{subnet}.{i + 2}" for i in range(count)}, directory)
        try:
            _ip("link", "add", network.bridge, "type", "bridge")
            _ip("addr", "add", f"{network.host_address}/24", "dev", network.bridge)
            _ip("link", "set", network.bridge, "up")
            for index, (node, address) in enumerate(network.nodes.items()):
                namespace, veth = network.namespace(node), f"d3v{tag}{index}"
                _ip("netns", "add", namespace)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
                _ip("link", "set", veth, "master", network.bridge, "up")
                _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", namespace, "link", "set", "eth0", "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
                hosts = ["127.0.0.1 localhost", *(f"{a} {n}" for n, a in network.nodes.items()), f"{address} {host}"]
                (directory / f"hosts-{node}").write_text("\n".join(hosts) + "\n")
        except BaseException:
            network.remove()
            raise
        return network

    def remove(self) -> None:
        """Delete what `create` made (veth pairs go with their namespace); parts never made are skipped."""
        for node in self.nodes:
            subprocess.run(["ip", "netns", "del", self.namespace(node)], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)

"""A private Slurm cluster on this one machine for the tests: its own munged, slurmctld and slurmd, started from
Debian's packages with a configuration, a munge key, free ports, state, spool and logs all under one temporary
directory.

Nothing system-wide is used (not /etc/slurm, /etc/munge, /run/munge, nor the default ports), so it can run beside
a real cluster, and it is gone when `stop` returns. Clients find it through `SLURM_CONF`. With one node, slurmd
runs beside slurmctld on 127.0.0.1 and the node is this host. With several (root only), each slurmd runs in its own
network namespace with its own address on a private bridge, the way separate machines would (see netns.py).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from netns import NodeNetwork

from d3d_cluster.monitor import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
PARTITION = "debug"
# Unix socket paths are limited to 107 bytes; munged's lives in the cluster directory.
_SOCKET_PATH_LIMIT = 100
_PR_SET_PDEATHSIG = 1
_ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD")


class ClusterStartError(RuntimeError):
    """The cluster did not come up; the message carries every daemon's log."""


def find_programs() -> tuple[dict[str, str], list[str]]:
    """The daemons and clients a cluster needs, and the names of those missing (sbin is not on every PATH)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {name: shutil.which(name, path=search) for name in DAEMONS + CLIENTS}
    return {name: path for name, path in found.items() if path}, [name for name, path in found.items() if not path]


def node_resources(slurmd: str) -> dict[str, int]:
    """CPUs and RealMemory (MiB) as slurmd itself measures them, so the node never registers with less than
    configured (which would drain it)."""
    measured = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    fields = dict(item.split("=", 1) for item in measured.split() if "=" in item)
    return {"CPUs": int(fields["CPUs"]), "RealMemory": int(fields["RealMemory"])}


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    cpus: int
    memory_mb: int


def slurm_conf(root: Path, controller: str, controller_address: str, nodes: list[Node], ctld_port: int,
               slurmd_port: int, user: str) -> str:
    """The cluster's slurm.conf: the settings that worked on these machines (NOTES.md), every path private."""
    settings = {
        "ClusterName": "d3dctest",
        "SlurmctldHost": f"{controller}({controller_address})",
        "SlurmctldPort": ctld_port,
        "SlurmdPort": slurmd_port,
        "SlurmUser": user,
        "SlurmdUser": user,
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={root / 'munge' / 'munge.socket'}",
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool" / "%n",
        "SlurmctldPidFile": root / "slurmctld.pid",
        "SlurmdPidFile": root / "slurmd-%n.pid",
        "SlurmctldLogFile": root / "log" / "slurmctld.log",
        "SlurmdLogFile": root / "log" / "slurmd-%n.log",
        "PlugStackConfig": root / "plugstack.conf",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "MpiDefault": "none",
        "ReturnToService": 2,
        # Cancelled test jobs are killed after 5 s rather than 30, so teardown is quick.
        "KillWait": 5,
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines += [f"NodeName={node.name} NodeAddr={node.address} CPUs={node.cpus} RealMemory={node.memory_mb} "
              "State=UNKNOWN" for node in nodes]
    lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: list[Node]
    programs: dict[str, str]
    network: NodeNetwork | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # in start order
    partition: str = PARTITION

    @property
    def node(self) -> str:
        return self.nodes[0].name

    @property
    def env(self) -> dict[str, str]:
        """The variables a client (and everything it starts) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30) -> str:
        done = subprocess.run([self.programs.get(command[0], command[0]), *command[1:]], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **self.env})
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def node_states(self) -> list[str]:
        return self.run("sinfo", "-h", "-N", "-o", "%t").split()

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"----- {path.name} -----\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def wait_for_job(self, job_id: str, timeout: float = 300) -> str:
        """`scontrol show job` once the job has left the running states (finished jobs stay listed MinJobAge)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.run("scontrol", "show", "job", job_id)
            state = shown.split("JobState=", 1)[1].split()[0]
            if state not in _ACTIVE_STATES:
                return shown
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")
            time.sleep(0.5)

    def cancel_all_jobs(self, timeout: float = 30) -> None:
        """Cancel this cluster's jobs and wait until they are gone, so no job step outlives slurmd."""
        self.run("scancel", f"--user={os.getuid()}")
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i").strip() and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop exactly the daemons this cluster started (by pid), its jobs first, munged last; then remove the
        node network."""
        ctld = self.processes.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self.cancel_all_jobs()
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        if self.network is not None:
            self.network.remove()
            self.network = None


def start_cluster(root: Path, programs: dict[str, str], nodes: int = 1, timeout: float = 120) -> SlurmCluster:
    """Write the configuration and key under `root`, start munged, slurmctld and one slurmd per node in the
    foreground as children of this process, and wait until every node is idle. On failure whatever was started
    is stopped and the error carries the daemons' logs."""
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    socket_path = root / "munge" / "munge.socket"
    if len(str(socket_path)) > _SOCKET_PATH_LIMIT:
        raise ClusterStartError(f"{socket_path}: too long for a unix socket; use a shorter temporary directory")
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    (root / "plugstack.conf").write_text("")

    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    cluster = SlurmCluster(root=root, conf=conf, nodes=[], programs=programs)
    env = {**os.environ, **cluster.env}
    log = root / "log"

    def launch(name: str, *command: str) -> None:
        with open(log / f"{name}.out", "ab") as out:
            cluster.processes[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                       stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                                       preexec_fn=_die_with_parent)

    try:
        measured = node_resources(programs["slurmd"])
        if nodes == 1:
            cluster.nodes = [Node(host, "127.0.0.1", measured["CPUs"], measured["RealMemory"])]
            controller_address = "127.0.0.1"
        else:
            network = cluster.network = NodeNetwork.create(nodes, host, root)
            # The nodes share this machine: each gets a share, so together they never claim more than it has.
            cpus, memory = max(1, measured["CPUs"] // nodes), measured["RealMemory"] // nodes
            cluster.nodes = [Node(name, address, cpus, memory) for name, address in network.nodes.items()]
            controller_address = network.host_address
        for node in cluster.nodes:
            (root / "spool" / node.name).mkdir()
        user = pwd.getpwuid(os.getuid()).pw_name  # not $USER: the daemons run as whoever we are
        conf.write_text(slurm_conf(root, host, controller_address, cluster.nodes, free_port(), free_port(), user))
        # --force: munged refuses directories it deems insecure, which temporary trees in containers often are.
        launch("munged", programs["munged"], "--foreground", "--force", f"--socket={socket_path}",
               f"--key-file={key}", f"--pid-file={root / 'munge' / 'munged.pid'}",
               f"--log-file={log / 'munged.log'}", f"--seed-file={root / 'munge' / 'munged.seed'}")
        _wait(lambda: socket_path.exists(), cluster, "munged to open its socket", timeout)
        launch("slurmctld", programs["slurmctld"], "-D", "-f", str(conf))
        _wait(lambda: "UP" in cluster.run("scontrol", "ping"), cluster, "slurmctld to answer", timeout)
        for node in cluster.nodes:
            inside = cluster.network.run_inside(node.name) if cluster.network else []
            launch(f"slurmd-{node.name}", *inside, programs["slurmd"], "-D", "-f", str(conf), "-N", node.name)
        _wait(lambda: cluster.node_states() == ["idle"] * nodes, cluster, f"{nodes} node(s) to be idle", timeout)
    except BaseException as error:
        cluster.stop()
        if isinstance(error, ClusterStartError):
            raise
        raise ClusterStartError(f"{error}\n{cluster.logs()}") from error
    return cluster


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies without stopping the cluster (killed by a
    timeout, say), so no daemon outlives the tests."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait(ready: Callable[[], bool], cluster: SlurmCluster, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(ready):
        exited = {name: p.returncode for name, p in cluster.processes.items() if p.poll() is not None}
        if exited or time.monotonic() > deadline:
            reason = f"exited: {exited}" if exited else f"not after {timeout:.0f} s"
            raise ClusterStartError(f"waiting for {what}: {reason}\n{cluster.logs()}")
        time.sleep(0.2)


def _answers(ready: Callable[[], bool]) -> bool:
    try:
        return ready()
    except (RuntimeError, subprocess.TimeoutExpired):
        return False

"""`d3dc doctor`: what this node has, and what a stage of the spec would use on it, one line per check.

Each line is ok, or says what is wrong and what to do about it; only a `fail` (something a stage on this node
needs is broken) makes the command exit non-zero. A `warn` is worth knowing but a stage runs anyway; `skip`
means the check does not apply here (NVDEC without a GPU). `d3dc submit doctor` runs the same checks as a job,
one task on each node the spec asks for (with its GPUs), outside any run; its logs go to WORKDIR/doctor-logs.

DeepSpeed is asked in a child process: it prints as it probes its ops, and it keeps the accelerator it found for
the life of the process, so the answer is the one a stage's fresh process would get.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from d3d_cluster.spec import ClusterSpec, MetricsSpec, Spec

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
LABELS = {OK: "ok", WARN: "warning", FAIL: "FAIL", SKIP: "skipped"}
LOGS = "doctor-logs"
JOB_MINUTES = 10  # the doctor job's time limit: it takes about a minute, and a short job starts sooner
# The VP9 sample DALI decodes: NVDEC decodes nothing smaller than 128x128 in VP9.
SAMPLE_FRAMES, SAMPLE_SIZE = 8, 128
NVCUVID_DIRS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def node_report(spec: Spec) -> dict:
    """Every check on this node for a stage of `spec`, as JSON-able data; `ok` is false when one failed."""
    cluster = spec.cluster
    stage, device = _guarded("stage", lambda: check_stage(spec))
    sample = _vp9_sample()
    checks = [
        _guarded("python", check_python),
        _guarded("torch", check_torch),
        _guarded("gpus", lambda: check_gpus(cluster)),
        _guarded("nccl", lambda: check_nccl(device)),
        stage,
        _guarded("dali", lambda: check_dali(device, sample)),
        _guarded("nvdec", lambda: check_nvdec(device, sample)),
        _guarded("deepspeed", lambda: check_deepspeed(device)),
        _guarded("slurm", lambda: check_slurm(cluster)),
        _guarded("metrics", lambda: check_metrics(spec.metrics, cluster)),
    ]
    return {"host": socket.gethostname(), "spec": spec.name, "executor": cluster.executor, "nodes": cluster.nodes,
            "ranks_per_node": cluster.tasks_per_node, "device_setting": cluster.device,
            "checks": [asdict(check) for check in checks], "ok": all(check.status != FAIL for check in checks)}


def _guarded(name: str, check: Callable):
    """A check that raises is a failed line naming the error, not a crashed doctor (`stage` also gives a device)."""
    try:
        return check()
    except Exception as error:  # noqa: BLE001 - the report is the place for any error
        failed = Check(name, FAIL, f"the check itself failed: {type(error).__name__}: {_short(error)}")
        return (failed, None) if name == "stage" else failed


def _short(error: object, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def check_python() -> Check:
    return Check("python", OK, f"{platform.python_version()} ({sys.executable})")


def check_torch() -> Check:
    import torch

    if torch.version.cuda is None:
        return Check("torch", OK, f"{torch.__version__}, CPU build (no CUDA)")
    cudnn = torch.backends.cudnn.version()
    return Check("torch", OK, f"{torch.__version__}, CUDA {torch.version.cuda} build, cuDNN {cudnn}")


def check_gpus(cluster: ClusterSpec) -> Check:
    import torch

    where = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
    with warnings.catch_warnings(record=True) as caught:  # e.g. a driver too old for this torch says so here
        warnings.simplefilter("always")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        devices = "; ".join(f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB"
                            for i, p in ((i, torch.cuda.get_device_properties(i)) for i in range(count)))
        detail = f"{count} visible ({where}): {devices}"
    else:
        why = _short(caught[-1].message) if caught else ("torch is built without CUDA" if torch.version.cuda is None
                                                          else "CUDA finds no device")
        detail = f"none visible ({where}; {why})"
    if cluster.device != "cpu" and ((cluster.wants_gpu and not count) or 1 < count < cluster.tasks_per_node):
        return Check("gpus", FAIL, f"{detail}; the spec's {cluster.tasks_per_node} ranks a node need one each: every "
                     "GPU of the node visible to each rank, or one bound to each",
                     "run on a node with the GPUs (a GPU partition), with the NVIDIA driver loaded")
    if cluster.device == "cpu":
        return Check("gpus", OK, f"{detail}; stages use none (cluster.device: cpu)")
    return Check("gpus", OK, detail if count else f"{detail}: stages run on the CPU")


def check_nccl(device) -> Check:
    import torch

    if torch.version.cuda is None:
        return Check("nccl", SKIP, "torch is built without CUDA")
    needed = device is not None and device.type == "cuda"
    if not torch.distributed.is_nccl_available():
        return Check("nccl", FAIL if needed else WARN, "this CUDA build of torch has no NCCL",
                     "install torch's CUDA build from PyTorch's wheels (they bundle NCCL)")
    version = torch.cuda.nccl.version()
    version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return Check("nccl", OK, version + ("" if needed else "; stages here use gloo"))


def check_stage(spec: Spec):
    """What a stage's first rank would use here: `launch.job`'s own choice, the process group and the precision."""
    import torch

    from d3d_cluster.launch.devices import DeviceUnavailable, DevicesSeen, compute_device
    from d3d_cluster.train.engine import autocast_dtype

    cluster = spec.cluster
    seen = DevicesSeen.here(cluster)
    try:
        device = compute_device(cluster, 0, seen)
    except DeviceUnavailable as error:
        fix = ("this torch is a CPU build: install torch's CUDA build (README: Installing on GPU nodes)"
               if torch.version.cuda is None else "")
        return Check("stage", FAIL, str(error), fix), None
    backend = "nccl" if device.type == "cuda" else "gloo"
    available = torch.distributed.is_nccl_available() if backend == "nccl" else torch.distributed.is_gloo_available()
    dtype = autocast_dtype(device, spec.model.precision)
    precision = f"{str(dtype).removeprefix('torch.')} autocast, fp32 weights" if dtype else "fp32"
    ranks = cluster.tasks_per_node
    bound = device.type == "cuda" and seen.count < ranks  # one GPU seen by the node's several ranks
    devices = f"cuda:0..cuda:{ranks - 1}" if device.type == "cuda" and ranks > 1 and not bound else str(device)
    detail = f"device {devices} for {'each of ' if bound else ''}the node's {ranks} rank{'s' if ranks > 1 else ''}, " \
             f"process group {backend}, precision {precision}"
    if not available:
        return Check("stage", FAIL, f"{detail}; this torch has no {backend}", "install a torch build with it"), device
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return Check("stage", WARN, f"{detail}; this GPU has no native bf16, autocast will be slow"), device
    if bound:
        return Check("stage", WARN, f"{detail}: one GPU seen here, taken as the one Slurm binds to each task; ranks "
                     "that all see this same GPU fail (NCCL runs one rank a GPU), and the local executor gives them "
                     "none (they train on the CPU)", "bind one GPU to each task (cluster.sbatch_options gpus-per-task: "
                     "1), or set cluster.tasks_per_node to the node's GPUs"), device
    return Check("stage", OK, detail), device


def _vp9_sample() -> bytes | Exception:
    """A short VP9 clip, made in memory as the shards' videos are (dataprep.video), or why it could not be."""
    try:
        import numpy as np

        from dataprep.video import encode_vp9

        texture = np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        frames = np.stack([texture[:, i : i + SAMPLE_SIZE] for i in range(SAMPLE_FRAMES)])
        return encode_vp9(frames, fps=25, keyframe_interval=SAMPLE_FRAMES, crf=30)
    except Exception as error:  # noqa: BLE001 - PyAV or libvpx missing: reported by the DALI lines
        return error


def _decode(sample: bytes, decoder: str, device_id: int | None) -> tuple[int, ...]:
    """The shape DALI's `decoder` ("cpu" or "mixed") gives the sample, in a pipeline of its own."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
    def decode():
        return fn.decoders.video(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1), device=decoder)

    pipeline = decode()
    pipeline.build()
    pipeline.feed_input("encoded", [np.frombuffer(sample, dtype=np.uint8)])
    (decoded,) = pipeline.run()
    return tuple(decoded.shape()[0])


def _decoded(shape: tuple[int, ...]) -> str | None:
    """Why a decoded shape is not the sample's, or None."""
    expected = (SAMPLE_FRAMES, SAMPLE_SIZE, SAMPLE_SIZE, 3)
    return None if shape == expected else f"decoded to shape {shape}, not {expected}"


def check_dali(device, sample: bytes | Exception) -> Check:
    import importlib.metadata

    try:
        import nvidia.dali
    except ImportError as error:
        return Check("dali", FAIL, f"not installed ({error})", "install DALI for torch's CUDA major version "
                     "(nvidia-dali-cuda120 for CUDA 12, nvidia-dali-cuda130 for CUDA 13)")
    wheels = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                    if (d.metadata["Name"] or "").lower().startswith("nvidia-dali"))
    version = f"{nvidia.dali.__version__} ({', '.join(wheels) or 'wheel unknown'})"
    if len(wheels) > 1:
        return Check("dali", WARN, f"{version}: more than one DALI wheel provides nvidia.dali",
                     "uninstall the one not built for torch's CUDA major version")
    if isinstance(sample, Exception):
        return Check("dali", WARN, f"{version}; no VP9 sample to decode ({_short(sample)})",
                     "install PyAV with libvpx (the project's requirements) to check decoding")
    needed = device is None or device.type == "cpu"  # a GPU stage decodes with NVDEC
    try:
        problem = _decoded(_decode(sample, "cpu", None))
    except Exception as error:  # noqa: BLE001 - DALI raises RuntimeError, and others from its C++ side
        problem = _short(error)
    if problem:
        return Check("dali", FAIL if needed else WARN, f"{version}: the CPU video decoder fails on a VP9 sample: "
                     f"{problem}", "reinstall DALI for torch's CUDA major version")
    return Check("dali", OK, f"{version}: the CPU decoder (fn.decoders.video) decoded a VP9 sample "
                             f"({SAMPLE_FRAMES} frames, {SAMPLE_SIZE}x{SAMPLE_SIZE})")


def _nvcuvid() -> tuple[list[str], list[str]]:
    """The driver's libnvcuvid.so as the loader lists it (`ldconfig -p`), and copies in the usual driver folders."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    listing = ""
    if Path(ldconfig).exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    listed = [line.split("=>")[-1].strip() for line in listing.splitlines() if "libnvcuvid.so" in line]
    present = [str(path) for folder in NVCUVID_DIRS for path in sorted(Path(folder).glob("libnvcuvid.so*"))]
    return listed, present


def check_nvdec(device, sample: bytes | Exception) -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("nvdec", SKIP, "no GPU")
    if isinstance(sample, Exception):
        return Check("nvdec", WARN, f"no VP9 sample to decode ({_short(sample)})")
    needed = device is not None and device.type == "cuda"
    listed, present = _nvcuvid()
    try:
        problem = _decoded(_decode(sample, "mixed", 0))
    except Exception as error:  # noqa: BLE001
        problem = _short(error)
    if problem is None:
        where = listed[0] if listed else "not listed by ldconfig -p"
        return Check("nvdec", OK, f"DALI's mixed decoder (NVDEC) decoded the VP9 sample on cuda:0 (libnvcuvid: "
                                  f"{where})" + ("" if needed else "; stages here decode on the CPU"))
    if present and not listed:
        fix = f"add {Path(present[0]).parent} to LD_LIBRARY_PATH: DALI opens libnvcuvid.so by name"
    elif not listed:
        fix = "install the NVIDIA driver's video decode library (libnvcuvid.so) on the node"
    else:
        fix = "check that libnvcuvid comes from the loaded driver, and that DALI is built for torch's CUDA major"
    return Check("nvdec", FAIL if needed else WARN, f"DALI's mixed decoder (NVDEC) fails: {problem} (libnvcuvid: "
                 f"{', '.join(listed) or 'not listed by ldconfig -p'})", fix)


def deepspeed_facts() -> dict:
    """DeepSpeed's version, accelerator and ops, as `ds_report` finds them (run in a child process)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    accelerator = get_accelerator()
    compatible = []
    for name, builder in ALL_OPS.items():
        with contextlib.suppress(Exception):  # a probe that fails means not compatible, as ds_report counts it
            if name != "deepspeed_not_implemented" and builder.is_compatible(False):
                compatible.append(name)
    return {"version": deepspeed.__version__, "accelerator": accelerator.device_name(),
            "backend": accelerator.communication_backend_name(), "compatible": compatible,
            "installed": sorted(name for name, built in installed_ops.items() if built)}


def check_deepspeed(device) -> Check:
    env = dict(os.environ)
    if device is not None and device.type == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")  # as a CPU stage's ranks set it (launch.job.distributed)
    try:
        done = subprocess.run([sys.executable, "-m", "d3d_cluster.launch.doctor", "deepspeed"], env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return Check("deepspeed", FAIL, "importing DeepSpeed took over 5 minutes", "check the node's filesystem")
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return Check("deepspeed", FAIL, f"cannot be imported: {_short(_last_line(done.stderr))}",
                     "install DeepSpeed without prebuilt ops (DS_BUILD_OPS=0 pip install deepspeed)")
    facts = json.loads(lines[-1])
    detail = (f"{facts['version']}, accelerator {facts['accelerator']} ({facts['backend']}); ops compatible: "
              f"{', '.join(facts['compatible']) or 'none'}; prebuilt: {', '.join(facts['installed']) or 'none'} "
              "(the stages build none)")
    expected = None if device is None else device.type
    if expected is not None and facts["accelerator"] != expected:
        forced = f" (DS_ACCELERATOR={os.environ['DS_ACCELERATOR']})" if "DS_ACCELERATOR" in os.environ else ""
        return Check("deepspeed", FAIL, f"{detail}; a stage here runs on {expected}{forced}",
                     "unset DS_ACCELERATOR" if forced else "install a DeepSpeed that supports CUDA")
    return Check("deepspeed", OK, detail)


def gpus_in_gres(gres: str) -> int:
    """GPUs a node has from sinfo's %G (`gpu:h100:8(S:0-1),shard:4`, `gpu:2`, `(null)`)."""
    count = 0
    for item in gres.split(","):
        name, *fields = item.split("(")[0].split(":")
        if name == "gpu":
            count += int(fields[-1]) if fields and fields[-1].isdigit() else 1
    return count


def partitions(sinfo: str) -> dict[str, dict]:
    """sinfo -h -o '%P|%G|%D' lines: per partition its node count, the most GPUs a node has, and the default."""
    found: dict[str, dict] = {}
    for line in sinfo.splitlines():
        if line.count("|") != 2:
            continue
        name, gres, nodes = line.split("|")
        entry = found.setdefault(name.rstrip("*"), {"nodes": 0, "gpus": 0, "default": name.endswith("*")})
        entry["nodes"] += int(nodes) if nodes.isdigit() else 0
        entry["gpus"] = max(entry["gpus"], gpus_in_gres(gres))
    return found


def check_slurm(cluster: ClusterSpec) -> Check:
    needed = cluster.executor == "slurm"
    unneeded = "; the local executor needs none"
    missing = [command for command in ("sbatch", "sinfo") if shutil.which(command) is None]
    if missing:
        if not needed:
            return Check("slurm", SKIP, f"no Slurm client ({', '.join(missing)} not on PATH){unneeded}")
        return Check("slurm", FAIL, f"cluster.executor is slurm, but {', '.join(missing)} cannot be found on PATH",
                     "run on the cluster's login node, or set cluster.executor: local")
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%P|%G|%D"], capture_output=True, text=True, timeout=60)
        answer = (_last_line(done.stderr) or f"exit status {done.returncode}") if done.returncode else None
    except subprocess.TimeoutExpired:
        done, answer = None, "no answer in 60 s"
    if answer is not None:
        detail = f"sbatch and sinfo are installed, but sinfo does not answer: {_short(answer)}"
        if not needed:
            return Check("slurm", SKIP, f"{detail}{unneeded}")
        return Check("slurm", FAIL, detail, "check SLURM_CONF (or /etc/slurm) and that slurmctld is up")
    found = partitions(done.stdout)
    listing = "; ".join(f"{name}{' (default)' if p['default'] else ''}: {p['nodes']} node(s), "
                        f"{p['gpus'] or 'no'} GPU(s) a node" for name, p in found.items())
    wanted = cluster.partition or next((name for name, p in found.items() if p["default"]), None)
    problem = fix = ""
    if cluster.partition is not None and cluster.partition not in found:
        problem, fix = f"no partition {cluster.partition!r}", "set cluster.partition (--partition) to one listed"
    elif cluster.gpus_per_node and (wanted is None or found[wanted]["gpus"] < cluster.gpus_per_node):
        has = f"{wanted} has at most {found[wanted]['gpus']}" if wanted else "no default partition is set, and"
        problem = f"cluster.gpus_per_node is {cluster.gpus_per_node}, but partition {has} GPUs a node"
        fix = "set cluster.partition (--partition) to a GPU partition"
    if problem:
        return Check("slurm", FAIL if needed else WARN, f"partitions: {listing or 'none'}; {problem}", fix)
    return Check("slurm", OK, f"partitions: {listing or 'none'}" + (f"; a stage goes to {wanted}" if wanted else ""))


def _bind(address: str, port: int) -> int:
    """Bind as the metrics endpoint would (an HTTP server: address reuse on), release; the port bound."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((address, port))
        return probe.getsockname()[1]


def check_metrics(metrics: MetricsSpec, cluster: ClusterSpec) -> Check:
    from d3d_cluster.metrics import bind_address

    bind = bind_address(metrics, cluster.executor)
    ports = [metrics.port + rank for rank in range(cluster.tasks_per_node)] if metrics.port else [0]
    taken = []
    for port in ports:
        try:
            bound = _bind(bind, port)
        except OSError as error:
            if port and error.errno == errno.EADDRINUSE:
                taken.append(port)
                continue
            return Check("metrics", FAIL, f"cannot bind {bind}:{port}: {error.strerror}",
                         "set metrics.bind to an address of this node, or null (all interfaces on Slurm, loopback "
                         "locally)")
    if not metrics.port:
        return Check("metrics", OK, f"{bind}: a free port per rank (metrics.port 0; this node gave {bound})")
    span = f"{bind}:{ports[0]}" + (f"-{ports[-1]}" if len(ports) > 1 else "")
    if taken:
        return Check("metrics", WARN, f"{span}: port(s) {', '.join(map(str, taken))} taken here; those ranks serve "
                     "on a free port instead (their target files name it)", "set metrics.port to a free range, or 0")
    return Check("metrics", OK, f"{span} free for the node's {len(ports)} rank(s)")


def format_report(report: dict) -> list[str]:
    """The report as lines: a heading, a line per check (with what to do under a problem), a verdict."""
    host = report["host"]
    lines = [f"d3dc doctor on {host}: spec {report['spec']}, {report['executor']} executor, {report['nodes']} "
             f"node(s) x {report['ranks_per_node']} rank(s), cluster.device {report['device_setting']}"]
    for check in report["checks"]:
        lines.append(f"{check['name']:<10} {LABELS[check['status']]}: {check['detail']}")
        if check["fix"]:
            lines.append(f"{'':<10} to fix: {check['fix']}")
    failed = [check["name"] for check in report["checks"] if check["status"] == FAIL]
    lines.append(f"{host}: {len(failed)} problem(s) to fix before a stage runs here: {', '.join(failed)}" if failed
                 else f"{host}: ok, nothing a stage here needs is broken")
    return lines


# `d3dc submit doctor`: the checks as a job on the compute nodes.

@dataclass(frozen=True)
class DoctorJob:
    """One task per node; what submitit pickles is the spec."""

    spec: Spec

    def __call__(self) -> dict:
        return node_report(self.spec)


def doctor_cluster(cluster: ClusterSpec) -> ClusterSpec:
    """What the doctor job asks Slurm for: the stage's nodes and resources (its GPUs too), one task a node, a
    short time limit."""
    minutes = min(cluster.timeout_min, JOB_MINUTES)
    return cluster.model_copy(update={"tasks_per_node": 1, "timeout_min": minutes,
                                      "signal_delay_s": min(cluster.signal_delay_s, minutes * 30)})


def doctor_script(spec: Spec) -> str:
    """The sbatch script of the doctor job (`--dry-run`)."""
    from d3d_cluster.launch.executor import sbatch_script

    return sbatch_script(doctor_cluster(spec.cluster), spec.path(LOGS), f"{spec.name}-doctor")


def submit_doctor(spec: Spec, echo: Callable[[str], None] = print) -> list[dict]:
    """Run the checks as a job, one task on each of the spec's nodes, and wait for it; each node's report."""
    from d3d_cluster.launch.executor import check_cluster, local_gpus, make_executor

    cluster = doctor_cluster(spec.cluster)
    check_cluster(cluster)
    executor = make_executor(cluster, spec.path(LOGS), name=f"{spec.name}-doctor")
    if cluster.executor == "local":  # the GPUs a local stage's ranks would be given, not one task's share
        executor.update_parameters(gpus_per_node=local_gpus(spec.cluster))
    job = executor.submit(DoctorJob(spec))
    echo(f"[doctor] submitted job {job.job_id} ({cluster.nodes} node(s), one task each; logs in {job.paths.folder}); "
         "waiting for it")
    return job.results()  # raises with the task's traceback when a task failed


if __name__ == "__main__":  # `python -m d3d_cluster.launch.doctor deepspeed`: check_deepspeed's child process
    if sys.argv[1:] != ["deepspeed"]:
        sys.exit("usage: python -m d3d_cluster.launch.doctor deepspeed")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints as it probes; the answer is the last line
        answer = deepspeed_facts()
    print(json.dumps(answer))

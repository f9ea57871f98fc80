"""`d3dc doctor` and `d3dc submit doctor`: the report of this (CPU) machine, a spec it cannot serve, the JSON form,
the checks as a local job, and the pieces that read Slurm's and the loader's answers."""

import errno
import json
import socket
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY

from d3d_cluster.cli import main
from d3d_cluster.launch import doctor
from d3d_cluster.spec import ClusterSpec, MetricsSpec

CHECKS = ["python", "torch", "gpus", "nccl", "stage", "dali", "nvdec", "deepspeed", "slurm", "metrics"]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's report")


def _spec_file(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "spec.yaml"
    cluster = {"executor": "local", **sections.pop("cluster", {})}  # not auto: a test's Slurm cluster would answer
    path.write_text(yaml.safe_dump({**TINY, "workdir": str(tmp_path / "work"), **sections, "cluster": cluster}))
    return path


def _lines(output: str) -> dict[str, str]:
    """Each check's line by its name (the text after the name)."""
    return {line.split(None, 1)[0]: line.split(None, 1)[1] for line in output.splitlines()
            if line.split(None, 1)[0] in CHECKS}


@cpu_only
def test_on_a_cpu_machine_the_report_shows_the_cpu_path_and_exits_0(tmp_path):
    result = CliRunner().invoke(main, ["doctor", "-c", str(_spec_file(tmp_path))])
    assert result.exit_code == 0, result.output
    lines = _lines(result.output)
    assert list(lines) == CHECKS
    assert lines["torch"].startswith(f"ok: {torch.__version__}")
    assert lines["gpus"].startswith("ok: none visible") and lines["gpus"].endswith("stages run on the CPU")
    assert lines["stage"] == "ok: device cpu for the node's 2 ranks, process group gloo, precision fp32"
    assert lines["dali"].startswith("ok: ")
    assert "the CPU decoder (fn.decoders.video) decoded a VP9 sample" in lines["dali"]
    assert lines["nvdec"] == "skipped: no GPU"
    assert lines["deepspeed"].startswith("ok: ") and "accelerator cpu (gloo)" in lines["deepspeed"]
    assert lines["metrics"].startswith("ok: 127.0.0.1: a free port per rank")
    assert result.output.splitlines()[-1] == f"{socket.gethostname()}: ok, nothing a stage here needs is broken"


@cpu_only
@pytest.mark.parametrize("cluster, asked", [
    ({"gpus_per_node": 8, "tasks_per_node": 8}, "cluster.gpus_per_node is 8"),
    ({"device": "cuda"}, "cluster.device is cuda"),
])
def test_a_spec_that_asks_for_gpus_fails_with_the_device_it_cannot_have_and_exits_1(tmp_path, cluster, asked):
    spec = _spec_file(tmp_path, cluster=cluster, deepspeed={"global_batch_size": 16})
    result = CliRunner().invoke(main, ["doctor", "-c", str(spec)])
    assert result.exit_code == 1, result.output
    lines = _lines(result.output)
    ranks = cluster.get("tasks_per_node", 2)
    assert lines["stage"].startswith(f"FAIL: {socket.gethostname()}: {asked}, but the node's {ranks} ranks find 0 "
                                     "CUDA device(s)")
    assert lines["gpus"].startswith("FAIL: none visible")
    assert "stage" in result.output.splitlines()[-1] and "problem(s) to fix" in result.output.splitlines()[-1]


def test_json_output_parses_with_every_check(tmp_path):
    result = CliRunner().invoke(main, ["doctor", "-c", str(_spec_file(tmp_path)), "--json"])
    report = json.loads(result.stdout)
    assert [check["name"] for check in report["checks"]] == CHECKS
    assert all(check["status"] in ("ok", "warn", "fail", "skip") for check in report["checks"])
    assert report["ok"] == (result.exit_code == 0) and report["ranks_per_node"] == 2
    assert report["host"] == socket.gethostname()


def test_submit_doctor_runs_the_checks_as_a_local_job_and_prints_its_report(tmp_path):
    result = CliRunner().invoke(main, ["submit", "doctor", "-c", str(_spec_file(tmp_path))])
    assert "[doctor] submitted job" in result.output, result.output
    lines = _lines(result.output)
    assert list(lines) == CHECKS
    # The job's own environment: submitit's local executor gives the task the GPUs a stage would get.
    assert "CUDA_VISIBLE_DEVICES=" in lines["gpus"] and "CUDA_VISIBLE_DEVICES=unset" not in lines["gpus"]
    assert result.exit_code == (0 if all(not line.startswith("FAIL") for line in lines.values()) else 1)
    assert list((tmp_path / "work" / "doctor-logs").glob("*_0_result.pkl"))
    assert not (tmp_path / "work" / "runs").exists()  # no run is made or touched


def test_the_doctor_job_asks_for_the_stages_nodes_and_gpus_with_one_task_a_node(tmp_path):
    spec = _spec_file(tmp_path, deepspeed={"global_batch_size": 16})
    result = CliRunner().invoke(main, ["submit", "doctor", "-c", str(spec), "--dry-run", "--cluster", "slurm",
                                       "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "600"])
    assert result.exit_code == 0, result.output
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", f"#SBATCH --time={doctor.JOB_MINUTES}",
                 "#SBATCH --job-name=quickstart-doctor",
                 f"#SBATCH --output={tmp_path / 'work' / 'doctor-logs'}/%j_0_log.out"):
        assert line + "\n" in result.output, line
    local = CliRunner().invoke(main, ["submit", "doctor", "-c", str(spec), "--dry-run", "--cluster", "local"])
    assert "runs doctor in the foreground, one task" in local.output
    assert not (tmp_path / "work").exists()


def test_partitions_and_their_gpus_are_read_from_sinfo():
    sinfo = "debug*|(null)|2\ngpu|gpu:h100:8(S:0-1),shard:4|6\ngpu|gpu:4|2\nsmall|gpu:1|1\n"
    assert doctor.partitions(sinfo) == {"debug": {"nodes": 2, "gpus": 0, "default": True},
                                        "gpu": {"nodes": 8, "gpus": 8, "default": False},
                                        "small": {"nodes": 1, "gpus": 1, "default": False}}


def test_without_a_slurm_client_slurm_is_skipped_for_the_local_executor_and_fails_for_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert doctor.check_slurm(ClusterSpec()).status == "skip"
    failed = doctor.check_slurm(ClusterSpec(executor="slurm"))
    assert failed.status == "fail" and "sbatch, sinfo cannot be found on PATH" in failed.detail
    assert failed.fix == "run on the cluster's login node, or set cluster.executor: local"


def test_a_partition_without_the_gpus_asked_for_fails(tmp_path, monkeypatch):
    sinfo = tmp_path / "sinfo"
    sinfo.write_text("#!/bin/sh\nprintf 'debug*|(null)|1\\ngpu|gpu:a100:4|3\\n'\n")
    sinfo.chmod(0o755)
    (tmp_path / "sbatch").symlink_to(sinfo)
    monkeypatch.setenv("PATH", str(tmp_path))
    ok = doctor.check_slurm(ClusterSpec(executor="slurm", partition="gpu", gpus_per_node=4, tasks_per_node=4))
    assert ok.status == "ok" and ok.detail == ("partitions: debug (default): 1 node(s), no GPU(s) a node; gpu: 3 "
                                               "node(s), 4 GPU(s) a node; a stage goes to gpu")
    too_few = doctor.check_slurm(ClusterSpec(executor="slurm", partition="gpu", gpus_per_node=8, tasks_per_node=8))
    assert too_few.status == "fail" and "cluster.gpus_per_node is 8, but partition gpu has at most 4" in too_few.detail
    unknown = doctor.check_slurm(ClusterSpec(executor="slurm", partition="big"))
    assert unknown.status == "fail" and "no partition 'big'" in unknown.detail


def test_a_metrics_port_taken_here_is_a_warning_and_an_address_not_here_a_failure():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = doctor.check_metrics(MetricsSpec(port=port), ClusterSpec(tasks_per_node=1))
    assert taken.status == "warn" and f"port(s) {port} taken here" in taken.detail
    elsewhere = doctor.check_metrics(MetricsSpec(bind="192.0.2.1"), ClusterSpec())
    assert elsewhere.status == "fail" and elsewhere.detail.startswith("cannot bind 192.0.2.1:0")


@pytest.mark.parametrize("listed, present, fix", [
    ([], ["/usr/lib64/libnvcuvid.so.1"], "add /usr/lib64 to LD_LIBRARY_PATH: DALI opens libnvcuvid.so by name"),
    ([], [], "install the NVIDIA driver's video decode library (libnvcuvid.so) on the node"),
])
def test_an_nvdec_failure_on_a_gpu_stage_says_where_the_drivers_decoder_library_is(monkeypatch, listed, present, fix):
    """No NVDEC on this machine: the GPU and DALI's answer are stand-ins, the advice is what is checked."""
    def no_decoder(sample, decoder, device_id):
        raise RuntimeError("Failed to load libnvcuvid.so")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(doctor, "_decode", no_decoder)
    monkeypatch.setattr(doctor, "_nvcuvid", lambda: (listed, present))
    check = doctor.check_nvdec(torch.device("cuda", 0), b"webm")
    assert check.status == "fail" and check.fix == fix
    assert check.detail == "DALI's mixed decoder (NVDEC) fails: Failed to load libnvcuvid.so (libnvcuvid: not listed " \
                           "by ldconfig -p)"
    assert doctor.check_nvdec(torch.device("cpu"), b"webm").status == "warn"  # a CPU stage does not need it


def test_a_check_that_raises_is_a_failed_line_not_a_crashed_doctor():
    def broken():
        raise OSError(errno.EIO, "input/output error")

    assert doctor._guarded("torch", broken) == doctor.Check(
        "torch", "fail", "the check itself failed: OSError: [Errno 5] input/output error")


@pytest.mark.parametrize("visible, status, stage", [
    (1, "warn", "device cuda:0 for each of the node's 4 ranks, process group nccl, precision bfloat16 autocast, fp32 "
                "weights: one GPU seen here, taken as the one Slurm binds to each task"),
    (4, "ok", "device cuda:0..cuda:3 for the node's 4 ranks, process group nccl, precision bfloat16 autocast, fp32 "
              "weights"),
    (2, "fail", f"{socket.gethostname()}: each of the node's 4 ranks sees 2 CUDA device(s)"),
], ids=["one-bound-to-each", "the-nodes-four", "two-for-four-ranks"])
def test_the_stage_line_gives_each_rank_the_gpu_bound_to_it_or_its_local_ranks_and_refuses_other_counts(
        monkeypatch, visible, status, stage):
    """No GPU on this machine: CUDA's answers are stand-ins, the device choice and its report are what is checked."""
    from types import SimpleNamespace

    from d3d_cluster.spec import Spec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="H100", total_memory=2**36))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    cluster = ClusterSpec(tasks_per_node=4, gpus_per_node=4)
    check, device = doctor.check_stage(Spec(cluster=cluster.model_dump(), deepspeed={"global_batch_size": 64}))
    assert check.status == status and check.detail.startswith(stage)
    assert device == (None if status == "fail" else torch.device("cuda", 0))
    assert doctor.check_gpus(cluster).status == ("fail" if status == "fail" else "ok")

"""What a job's ranks do before and after training: record any rank's failure with its rank, host and whether a
requeue can help, and never run silently on CPUs where GPUs were asked for."""

import errno
import signal
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import TINY, tiny_spec

from d3d_cluster.data.pipeline import CorruptStep
from d3d_cluster.launch.devices import DeviceUnavailable
from d3d_cluster.launch.job import StopSignals, failures_recorded, seed_model_randomness
from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.launch.requeue import requeue_lost
from d3d_cluster.rundir import RunDir
from d3d_cluster.train.loop import NonFiniteLoss


@pytest.fixture
def local_rank_one(monkeypatch):
    """The environment submitit's local executor gives its second task."""
    for name, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_GLOBALID": "1",
                        "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_NODEID": "0",
                        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("error, retryable", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (NonFiniteLoss("3 consecutive steps had a NaN or infinite loss"), False),
    (CorruptStep("rank 1: every sample of a step is corrupt"), False),
    (ValueError("data.shards: no manifest.json"), False),
    (DeviceUnavailable("node7: cluster.device is cuda, but ..."), False),
    (dist.DistBackendError("NCCL communicator was aborted: watchdog timeout"), True),
    (OSError(errno.EIO, "Input/output error"), True),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value))
def test_a_failing_rank_records_its_error_rank_host_and_whether_a_requeue_can_help(error, retryable, tmp_path,
                                                                                  local_rank_one):
    run = RunDir.create(tiny_spec(tmp_path))
    with pytest.raises(type(error)), failures_recorded(run.path, "teacher"):
        raise error
    (failed,) = run.events()
    assert failed["event"] == "failed" and failed["stage"] == "teacher" and failed["job_id"] == "4242"
    assert (failed["rank"], failed["host"], failed["retryable"]) == (1, socket.gethostname(), retryable)
    assert failed["error"] == f"{type(error).__name__}: {error}"


def test_a_rank_exiting_to_be_requeued_or_cancelled_records_no_failure(tmp_path, local_rank_one):
    run = RunDir.create(tiny_spec(tmp_path))
    with pytest.raises(SystemExit), failures_recorded(run.path, "teacher"):
        raise SystemExit(144)
    assert run.events() == []


@pytest.mark.integration
def test_a_stage_asking_for_gpus_on_a_machine_without_them_fails_at_once_and_is_not_requeued(tmp_path, tiny_shards):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU for each rank: the stage would train on them")
    run = RunDir.create(tiny_spec(tmp_path, data={**TINY["data"], "shards": str(tiny_shards)},
                                  cluster={"device": "cuda"}))
    with pytest.raises(Exception, match="DeviceUnavailable"):
        run_stage(run, "teacher", echo=lambda line: None, poll_seconds=0.2)
    failed = [e for e in run.events() if e["event"] == "failed"]
    assert sorted(e["rank"] for e in failed) == [0, 1] and not any(e["retryable"] for e in failed)
    assert not any(e["event"] in ("started", "checkpointed") for e in run.events())  # no rank trained on its CPU
    decision = requeue_lost(run.path, "teacher", failed[0]["job_id"], exit_code=1)
    assert decision.startswith("not requeued: DeviceUnavailable: ") and "(rank " in decision


def test_the_exit_hook_does_not_requeue_a_job_one_of_whose_ranks_failed_for_good_whatever_its_peers_recorded(
        tmp_path):
    run = RunDir.create(tiny_spec(tmp_path))
    run.event("started", stage="teacher", job_id="77", world_size=4)
    run.event("failed", stage="teacher", job_id="77", rank=3, host="gpu7", retryable=False,
              error="OutOfMemoryError: CUDA out of memory")
    run.event("failed", stage="teacher", job_id="77", rank=0, host="gpu1", retryable=True,
              error="DistBackendError: connection reset by peer")
    assert requeue_lost(run.path, "teacher", "77", exit_code=1) == \
        "not requeued: OutOfMemoryError: CUDA out of memory (rank 3 on gpu7)"


def test_ranks_start_from_one_network_and_then_draw_their_own_dropout_masks():
    from d3d_cluster.models import S3DG

    def rank(number: int):
        torch.manual_seed(0)  # as a stage job seeds before building its network
        weights = S3DG(3, width=0.25, dropout=0.5).state_dict()
        seed_model_randomness(0, number)
        return weights, torch.nn.functional.dropout(torch.ones(10_000), 0.5)

    (weights0, mask0), (weights1, mask1), (_, mask0_again) = rank(0), rank(1), rank(0)
    assert all(torch.equal(weights0[key], weights1[key]) for key in weights0)
    assert not torch.equal(mask0, mask1) and torch.equal(mask0, mask0_again)


def test_a_stop_signal_only_sets_a_flag_and_the_polling_loop_reports_it_once(capsys):
    previous = {number: signal.getsignal(number) for number in StopSignals.SIGNALS}
    try:
        stop = StopSignals()
        signal.raise_signal(signal.SIGUSR2)
        signal.raise_signal(signal.SIGTERM)  # a second warning changes nothing
        assert capsys.readouterr().out == ""  # the handler wrote nothing
        assert stop() and stop() and stop.received == "SIGUSR2"
        assert capsys.readouterr().out == "received SIGUSR2: checkpointing at the next step boundary\n"
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)

"""Precomputed teacher outputs: the student trains exactly as with its live teacher, reads no flow, reuses a matching
side file and refuses (then replaces) a stale one. Real stage jobs in this process: DALI, DeepSpeed on one gloo rank."""

import errno
import json
import os
import re
import shutil
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_spec

from d3d_cluster.data import index
from d3d_cluster.data.index import ShardReadError
from d3d_cluster.data.pipeline import ClipLoader
from d3d_cluster.data.schema import FLOW_EXT
from d3d_cluster.launch.job import Rank, _train_stage
from d3d_cluster.launch.pipeline import run_stage
from d3d_cluster.rundir import RunDir
from d3d_cluster.models import S3DG
from d3d_cluster.train.stages import build_stage, with_precomputed_teacher
from d3d_cluster.train.teacher_outputs import (DIRECTORY_NAME, MANIFEST_NAME, PREFETCHED_BATCHES,
                                               StaleTeacherOutputs, TeacherOutputs, _complete, _create_epoch,
                                               _partial_path, _RowWriter, _start, check_space, epoch_path, fingerprint,
                                               output_shape)

CPU = torch.device("cpu")
RANK = Rank(0, 1, 0, CPU, "test", "127.0.0.1:0", "local")
EPOCHS = 2


def _teacher(seed: int) -> dict:
    """Weights with outputs of a trained network's scale: BatchNorm statistics gathered on random clips (at
    initialisation, the Mixed_5c map is about 1e-10 and would round to zero in float16)."""
    torch.manual_seed(seed)
    teacher = S3DG(3, in_channels=2, width=0.25)
    for module in teacher.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the batches
    with torch.no_grad():
        for _ in range(3):
            teacher(torch.randn(4, 2, 8, 24, 24))
    return teacher.state_dict()


def _run(workdir, shards, name: str, teacher: dict, batch_size: int = 2, ranks: int = 1, target: str = "logits",
         **distill) -> RunDir:
    """A run whose student distils `target` (logits unless a test says otherwise: float32 rows, compared exactly)."""
    spec = tiny_spec(workdir, name=name, data={**TINY["data"], "shards": str(shards), "batch_size": batch_size},
                     deepspeed={"global_batch_size": 2 * batch_size}, cluster={"tasks_per_node": ranks},
                     student={"epochs": EPOCHS, "distill": {"target": target, **distill}})
    run = RunDir.create(spec)
    torch.save(teacher, run.stage("teacher") / "model.pt")
    return run


@pytest.fixture
def threads():
    """`_train_stage` sets the thread count of the spec's CPU ranks; give the rest of the session its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _train_student(run: RunDir) -> list[dict]:
    _train_stage(run.path, "student", RANK, stop=lambda: False)
    return [json.loads(line) for line in (run.path / "student" / "train_log.jsonl").read_text().splitlines()]


def _corrupt_flow(shards, tmp_path, victim: int):
    """A copy of the shards in which one train sample's flow cannot be decoded (its length, so every offset, kept)."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    loader = ClipLoader(copy, "train", tiny_spec(tmp_path).data, modalities=("flow",), rank=0, world=1, seed=0,
                        train=True)
    member = loader.table.members[victim][FLOW_EXT]
    tar, key = loader.table.tars[member.tar], loader.table.keys[victim]
    loader.close()
    with open(tar, "r+b") as handle:
        handle.seek(member.offset)
        handle.write(b"\x00garbage" * (member.size // 8))
    return copy, key


@pytest.mark.parametrize("target, corrupt", [("logits", False), ("mixed_5c", False), ("conv_2c", False),
                                             ("logits", True)])
def test_precomputed_teacher_gives_the_live_teachers_step_losses(tmp_path, tiny_shards, deepspeed_single_rank, threads,
                                                                 target, corrupt):
    shards, victim = _corrupt_flow(tiny_shards, tmp_path, victim=2) if corrupt else (tiny_shards, None)
    batch_size = 3 if corrupt else 2  # 11 clips in batches of 2 would end on a 1-clip step: BatchNorm refuses it
    teacher = _teacher(1)
    live = _train_student(_run(tmp_path / "live", shards, "live", teacher, batch_size, target=target))
    run = _run(tmp_path / "pre", shards, "pre", teacher, batch_size, target=target, precompute=True)
    precomputed = _train_student(run)

    assert [s["step"] for s in precomputed] == [s["step"] for s in live] and len(live) > EPOCHS
    # Logits are stored as float32: every step's losses are the live run's (bitwise, on this CPU). Feature maps are
    # stored as float16: the first step's distillation term moves by the rounding of its target (about 1e-4); after
    # it, Adam turns any such difference into a slightly different trajectory, as it would any perturbation.
    compared = slice(None) if target == "logits" else slice(0, 1)
    tolerance = dict(rtol=1e-6, atol=1e-7) if target == "logits" else dict(rtol=1e-3, atol=0)
    for name in ("loss", "cross_entropy", "distillation"):
        torch.testing.assert_close(torch.tensor([s[name] for s in precomputed[compared]], dtype=torch.float64),
                                   torch.tensor([s[name] for s in live[compared]], dtype=torch.float64), **tolerance)
    assert all(s["distillation"] > 0 for s in live)

    # Why: every stored row is the live teacher's output on the flow the live student's loader (RGB + flow) hands
    # out for that (epoch, sample): the views are the same function of (seed, epoch, sample) in both loaders.
    spec = run.spec()
    directory = run.path / "student" / DIRECTORY_NAME
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert manifest["epochs"] == list(range(EPOCHS))
    assert [record["key"] for record in manifest["unusable"]] == ([victim] if corrupt else [])
    stage = build_stage(spec, "student", run.path, 3, CPU)
    keys = list(ClipLoader(shards, "train", spec.data, modalities=("flow",), rank=0, world=1, seed=0,
                           train=True).table.keys)
    outputs = TeacherOutputs(directory, fingerprint(spec, run.path / "teacher" / "model.pt", keys,
                                                    manifest["fingerprint"]["shards"], CPU), EPOCHS)
    assert outputs.unusable == ([keys.index(victim)] if corrupt else [])
    loader = ClipLoader(shards, "train", spec.data, modalities=("rgb", "flow"), rank=0, world=1, seed=spec.seed,
                        train=True, epochs=EPOCHS, whole_epochs=True)
    seen = 0
    for epoch in range(EPOCHS):
        for batch in loader.epoch(epoch):
            stored = outputs.targets(batch.epochs, batch.samples)
            assert stored.dtype == (torch.float32 if target == "logits" else torch.float16)
            expected = stage.teacher_output(batch)
            torch.testing.assert_close(stored.float(), expected.to(stored.dtype).float(), rtol=0, atol=0)
            seen += len(batch.samples)
    loader.close()
    assert seen == EPOCHS * (len(keys) - corrupt)


def test_student_with_stored_outputs_decodes_rgb_only_and_a_requeue_reuses_them(tmp_path, tiny_shards,
                                                                                 deepspeed_single_rank):
    run = _run(tmp_path, tiny_shards, "reuse", _teacher(1), precompute=True)
    spec = run.spec()
    stage = with_precomputed_teacher(build_stage(spec, "student", run.path, 3, CPU), spec, run.path, 0, 1, None)
    assert stage.teacher is None and stage.modalities == ("rgb",)
    files = sorted((run.path / "student" / DIRECTORY_NAME).iterdir())
    assert [f.name for f in files] == ["epoch-0000.npy", "epoch-0001.npy", MANIFEST_NAME]  # no parts left
    written = {f: f.stat().st_mtime_ns for f in files}

    again = with_precomputed_teacher(build_stage(spec, "student", run.path, 3, CPU), spec, run.path, 0, 1, None)
    assert {f: f.stat().st_mtime_ns for f in files} == written
    epochs, samples = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 5])  # a step across two epochs
    torch.testing.assert_close(again.precomputed.targets(epochs, samples), stage.precomputed.targets(epochs, samples))


def test_a_shard_the_os_cannot_read_fails_the_precompute_and_no_sample_is_written_down_unusable(
        tmp_path, tiny_shards, deepspeed_single_rank, monkeypatch):
    run = _run(tmp_path, tiny_shards, "unreadable", _teacher(1), precompute=True)
    spec = run.spec()
    loader = ClipLoader(tiny_shards, "train", spec.data, modalities=("flow",), rank=0, world=1, seed=0, train=True)
    tar = loader.table.tars[loader.table.members[2][FLOW_EXT].tar]
    loader.close()
    pread = os.pread

    def failing(fd, size, offset):
        if os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(tar):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return pread(fd, size, offset)

    monkeypatch.setattr(index.os, "pread", failing)
    with pytest.raises(ShardReadError, match=re.escape(str(tar))):
        with_precomputed_teacher(build_stage(spec, "student", run.path, 3, CPU), spec, run.path, 0, 1, None)
    manifest = json.loads((run.path / "student" / DIRECTORY_NAME / MANIFEST_NAME).read_text())
    assert manifest["unusable"] == [] and manifest["epochs"] == []


def test_outputs_of_other_teacher_weights_are_refused_then_computed_again(tmp_path, tiny_shards,
                                                                           deepspeed_single_rank, capfd):
    run = _run(tmp_path, tiny_shards, "stale", _teacher(1), precompute=True)
    spec = run.spec()
    first = with_precomputed_teacher(build_stage(spec, "student", run.path, 3, CPU), spec, run.path, 0, 1, None)
    directory = run.path / "student" / DIRECTORY_NAME
    old_rows = np.load(epoch_path(directory, 0))

    torch.save(_teacher(2), run.path / "teacher" / "model.pt")  # the teacher was trained again
    stored = json.loads((directory / MANIFEST_NAME).read_text())["fingerprint"]
    retrained = fingerprint(spec, run.path / "teacher" / "model.pt", first.precomputed.keys, stored["shards"], CPU)
    with pytest.raises(StaleTeacherOutputs, match=f"{directory}: the teacher outputs were computed for another "
                                                  "teacher_sha256; they must be computed again"):
        TeacherOutputs(directory, retrained, EPOCHS)

    stage = with_precomputed_teacher(build_stage(spec, "student", run.path, 3, CPU), spec, run.path, 0, 1, None)
    assert "computed for another teacher_sha256: computing them again" in capfd.readouterr().out
    assert json.loads((directory / MANIFEST_NAME).read_text())["fingerprint"] == retrained
    assert not np.allclose(np.load(epoch_path(directory, 0)), old_rows)
    assert stage.precomputed.targets(torch.tensor([0]), torch.tensor([0])).shape == (1, 3)
    with pytest.raises(ValueError, match=r"teacher outputs of epochs \[2\] have not been computed"):
        TeacherOutputs(directory, retrained, EPOCHS + 1)


def test_outputs_the_disk_cannot_hold_are_refused_before_the_student_is_queued(tmp_path):
    spec = tiny_spec(tmp_path, student={"epochs": 20, "distill": {"precompute": True, "target": "mixed_5c"}},
                     model={"width": 1.0}, data={**TINY["data"], "clip_frames": 64, "crop_size": 224},
                     prep={**TINY["prep"], "short_side": 256, "synthetic": {"frames": 80}})
    assert output_shape(spec, 400) == (1024, 8, 7, 7)  # 0.8 MB a clip in float16
    check_space(spec, 400, train_samples=100)
    with pytest.raises(ValueError, match=r"student.distill.precompute: the teacher outputs of 240000 clips x 20 epochs "
                                         r"\(mixed_5c, 802816 bytes a clip\) need 3588.9 GiB, and .* GiB free"):
        check_space(spec, 400, train_samples=240_000)


def test_outputs_whose_reading_would_outgrow_a_nodes_memory_are_refused_before_queueing(tmp_path):
    """Per rank: a batch of the teacher's maps (float32 and float16), 16 batches of targets read ahead and 512 bytes
    a sample key: 8 ranks of 16 clips of mixed_5c over 240,000 samples need 2.73 GiB a node (the epochs' 179 GiB
    stay on disk)."""
    def spec(mem: str):
        return tiny_spec(tmp_path, student={"epochs": 1, "distill": {"precompute": True, "target": "mixed_5c"}},
                         model={"width": 1.0}, data={**TINY["data"], "clip_frames": 64, "crop_size": 224,
                                                     "batch_size": 16},
                         deepspeed={"global_batch_size": 128}, cluster={"executor": "slurm", "tasks_per_node": 8,
                                                                        "mem": mem},
                         prep={**TINY["prep"], "short_side": 256, "synthetic": {"frames": 80}})

    check_space(spec("3G"), 400, train_samples=100)
    with pytest.raises(ValueError, match=re.escape(
            "student.distill.precompute: each of cluster.tasks_per_node = 8 ranks holds up to 349.9 MiB of teacher "
            "outputs (data.batch_size = 16 clips of 802816 bytes (mixed_5c), 16 batches read ahead, 240000 sample "
            "keys), 2.73 GiB a node, over cluster.mem = 2G (2.00 GiB); lower data.batch_size")):
        check_space(spec("2G"), 400, train_samples=240_000)


KEYS = [f"video-{sample}" for sample in range(4)]
CORRUPT = {"key": KEYS[1], "shard": "train-0000.tar", "modality": "flow", "error": "damaged frame"}


def _epoch_by_two_ranks(directory, epoch: int, shares: list[list[int]], found: list[list[dict]]) -> None:
    """One epoch as the pass writes it, its two ranks played in turn: rank 0 creates the file, each rank writes its
    share's rows (every value of a row sample + epoch / 10), rank 0 completes it from what each rank reports (its
    samples, and the corrupt samples its loader has found so far)."""
    _create_epoch(directory, epoch, (len(KEYS), 3), np.float32)
    reports = []
    for share, corrupt in zip(shares, found):
        with _RowWriter(_partial_path(directory, epoch)) as rows:
            for sample in share:
                rows.write(np.array([sample]), np.full((1, 3), sample + epoch / 10, np.float32))
        reports.append({"samples": rows.samples(), "skipped": corrupt})
    _complete(directory, epoch, reports, seconds=1.0)


def test_a_sample_undecodable_in_one_epoch_only_has_rows_in_the_others_and_the_student_skips_it(tmp_path):
    """Rank 1 finds sample 1 corrupt in epoch 1 (a view reaching its damage) and keeps reporting it; rank 0, whose
    loader never found it, computes it in epoch 2. Each epoch's rows are computed or skipped once."""
    expected = {"keys": KEYS}
    _start(tmp_path, expected)
    _epoch_by_two_ranks(tmp_path, 0, [[0, 1], [2, 3]], [[], []])
    _epoch_by_two_ranks(tmp_path, 1, [[0, 2], [3]], [[], [CORRUPT]])
    _epoch_by_two_ranks(tmp_path, 2, [[1, 3], [0, 2]], [[], [CORRUPT]])

    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["epochs"] == [0, 1, 2]
    assert manifest["unusable"] == [{"sample": 1, **CORRUPT, "epochs": [1]}]
    outputs = TeacherOutputs(tmp_path, expected, 3)
    assert outputs.unusable == [1]  # the student's loader leaves it out of every epoch
    torch.testing.assert_close(outputs.targets(torch.tensor([0, 2, 2]), torch.tensor([1, 1, 3])),
                               torch.tensor([[1.0] * 3, [1.2] * 3, [3.2] * 3]))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: no teacher output for samples ['video-1 (epoch 1)']")):
        outputs.targets(torch.tensor([1]), torch.tensor([1]))


def test_an_epoch_with_a_row_no_rank_computed_or_found_unusable_is_refused(tmp_path):
    _start(tmp_path, {"keys": KEYS})
    _epoch_by_two_ranks(tmp_path, 0, [[0, 2], [3]], [[CORRUPT], []])
    with pytest.raises(RuntimeError, match=re.escape(
            f"{_partial_path(tmp_path, 1)}: 2 rows computed and 1 samples skipped as unusable in epoch 1, but the "
            "split has 4: no rank computed ['video-2']")):
        _epoch_by_two_ranks(tmp_path, 1, [[0], [3]], [[CORRUPT], []])
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["epochs"] == [0]


def test_an_epoch_is_written_and_completed_holding_a_batch_of_its_rows_at_most(tmp_path):
    """2048 rows of 16 KiB (a 32 MiB epoch) written in batches of 16 in a shuffled order, as a rank's share comes."""
    keys = [f"video-{sample}" for sample in range(2048)]
    _start(tmp_path, {"keys": keys})
    order = np.random.default_rng(0).permutation(len(keys))
    tracemalloc.start()
    _create_epoch(tmp_path, 0, (len(keys), 4096), np.float32)
    with _RowWriter(_partial_path(tmp_path, 0)) as rows:
        for batch in np.split(order, len(keys) // 16):
            rows.write(batch, np.repeat(batch.astype(np.float32)[:, None], 4096, axis=1))
    _complete(tmp_path, 0, [{"samples": rows.samples(), "skipped": []}], seconds=1.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    assert peak < 2**21  # a batch of rows is 256 KiB, the epoch 32 MiB
    stored = np.load(epoch_path(tmp_path, 0))
    np.testing.assert_array_equal(stored, np.repeat(np.arange(len(keys), dtype=np.float32)[:, None], 4096, axis=1))


def test_targets_prefetched_are_read_on_reader_threads_and_taken_by_the_step(tmp_path, monkeypatch):
    expected = {"keys": KEYS}
    _start(tmp_path, expected)
    for epoch in range(2):
        _epoch_by_two_ranks(tmp_path, epoch, [[0, 1], [2, 3]], [[], []])
    outputs = TeacherOutputs(tmp_path, expected, 2)
    readers = []
    rows = TeacherOutputs._rows

    def recorded(self, *args):
        readers.append(threading.current_thread().name)
        return rows(self, *args)

    monkeypatch.setattr(TeacherOutputs, "_rows", recorded)
    epochs, samples = torch.tensor([0, 1, 1]), torch.tensor([3, 1, 0])  # a step across two epochs
    prefetched = outputs.prefetch(epochs, samples)
    taken = outputs.targets(epochs, samples)
    assert taken is prefetched.result()
    torch.testing.assert_close(taken, torch.tensor([[3.0] * 3, [1.1] * 3, [0.1] * 3]))
    assert len(readers) == 1 and readers[0].startswith("teacher-outputs")

    # What waits to be taken is bounded: the oldest read is dropped, and its batch read by the step when it comes.
    batches = [(torch.tensor([step // 16 % 2] * 2), torch.tensor([step % 4, step // 4 % 4]))
               for step in range(PREFETCHED_BATCHES + 1)]
    for batch in batches:
        outputs.prefetch(*batch).result()
    readers.clear()
    outputs.targets(*batches[0])
    outputs.targets(*batches[-1])
    assert readers == [threading.current_thread().name]


def test_two_ranks_store_every_clip_once_as_the_teacher_sees_it(tmp_path, tiny_shards, threads):
    """A real 2-rank student job (local executor): each rank computes its share, rank 0 merges them."""
    run = _run(tmp_path, tiny_shards, "two", _teacher(1), ranks=2, precompute=True)
    echoed = []
    run_stage(run, "student", echo=echoed.append, poll_seconds=0.2)
    assert any(line.startswith("[student] teacher outputs of epoch 1 computed") for line in echoed)
    directory = run.path / "student" / DIRECTORY_NAME
    assert sorted(f.name for f in directory.iterdir()) == ["epoch-0000.npy", "epoch-0001.npy", MANIFEST_NAME]

    # Each rank's share again, as the ranks ran it (one thread each: another thread count, or other batch-mates,
    # rounds oneDNN's sums differently), through the live teacher: the same numbers, each row filled once.
    spec = run.spec()
    stage = build_stage(spec, "student", run.path, 3, CPU)
    torch.set_num_threads(spec.cluster.cpus_per_task)
    stored = [np.load(epoch_path(directory, epoch)) for epoch in range(EPOCHS)]
    seen = [[] for _ in range(EPOCHS)]
    for rank in range(2):
        loader = ClipLoader(tiny_shards, "train", spec.data, modalities=("flow",), rank=rank, world=2, seed=spec.seed,
                            train=True, epochs=EPOCHS, whole_epochs=True)
        for epoch in range(EPOCHS):
            for batch in loader.epoch(epoch):
                torch.testing.assert_close(torch.from_numpy(stored[epoch][batch.samples.numpy()]),
                                           stage.teacher_output(batch), rtol=0, atol=0)
                seen[epoch] += batch.samples.tolist()
        loader.close()
    assert all(sorted(samples) == list(range(len(stored[0]))) for samples in seen)

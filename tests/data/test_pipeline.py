import errno
import io
import itertools
import json
import os
import re
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from d3d_cluster.data import index
from d3d_cluster.data.index import ShardReadError
from d3d_cluster.data.order import View
from d3d_cluster.data.pipeline import (ClipLoader, LoaderState, _Planned, _build_pipeline, _to_torch,
                                       decodes_on_gpu, training_steps)
from d3d_cluster.data.schema import FLOW_EXT, RGB_EXT, Manifest, frame_to_flow
from d3d_cluster.spec import DataSpec

DATA = DataSpec(clip_frames=8, crop_size=24, batch_size=2)


def _loader(shards, split="train", rank=0, world=1, train=True, epochs=1, modalities=("rgb", "flow"), data=DATA,
            **kwargs):
    return ClipLoader(shards, split, data, modalities=modalities, rank=rank, world=world, seed=0, train=train,
                      epochs=epochs, **kwargs)


def _keys(loader, batches):
    return [loader.table.keys[int(s)] for b in batches for s in b.samples]


@pytest.mark.parametrize("crop_area", [None, [0.3, 1.0]])
def test_batches_carry_rgb_and_flow_clips_with_their_labels(tiny_shards, crop_area):
    loader = _loader(tiny_shards, data=DATA.model_copy(update={"crop_area": crop_area}))
    assert loader.resizes == (crop_area is not None)
    batch = next(loader.batches())
    assert batch.rgb.shape == (2, 3, 8, 24, 24) and batch.rgb.dtype == torch.float32
    assert batch.flow.shape == (2, 2, 8, 24, 24)
    assert batch.flow.abs().max() <= (1.0 if crop_area is None else 1.0 / 0.3)
    assert batch.labels.tolist() == [loader.table.label(int(s)) for s in batch.samples]
    loader.close()


def test_one_modality_decodes_only_that_one(tiny_shards):
    loader = _loader(tiny_shards, modalities=("flow",))
    batch = next(loader.batches())
    assert batch.rgb is None and batch.flow.shape[1] == 2
    loader.close()


def _epoch_keys(loader, batches) -> dict[int, list[str]]:
    """The keys each epoch's clips came from, in the order they were handed out."""
    keys: dict[int, list[str]] = {}
    for batch in batches:
        for epoch, sample in zip(batch.epochs.tolist(), batch.samples.tolist()):
            keys.setdefault(epoch, []).append(loader.table.keys[sample])
    return keys


@pytest.mark.parametrize("world, batch", [(1, 2), (2, 2), (3, 2), (5, 2), (2, 5)])
def test_the_world_trains_on_full_steps_that_use_every_sample_once_per_epoch(tiny_shards, world, batch):
    """12 training videos: 2 epochs in windows of world x batch clips, an epoch's remainder opening the next one's
    first step; only the last epoch's remainder, fewer clips than a step, is not read."""
    data = DATA.model_copy(update={"batch_size": batch})
    loaders = [_loader(tiny_shards, rank=r, world=world, epochs=2, data=data) for r in range(world)]
    per_rank = [list(loader.batches()) for loader in loaders]
    steps, _ = training_steps(Manifest.load(tiny_shards), data, world, 2)
    assert [len(batches) for batches in per_rank] == [steps] * world == [24 // (world * batch)] * world
    assert all(len(b.labels) == batch for batches in per_rank for b in batches)
    seen: dict[int, list[str]] = {}
    for loader, batches in zip(loaders, per_rank):
        for epoch, keys in _epoch_keys(loader, batches).items():
            seen.setdefault(epoch, []).extend(keys)
    keys = sorted(loaders[0].table.keys)
    assert sorted(seen[0]) == keys
    assert len(set(seen[1])) == len(seen[1]) == 12 - 24 % (world * batch)
    assert {loader.state() for loader in loaders} == {LoaderState(2, 0, 0, loaders[0].shard_hash)}  # finished
    for loader in loaders:
        loader.close()


def test_a_split_whose_last_steps_crashed_the_pipelines_trains_full_steps_on_every_rank(shards_of_35):
    """35 training videos on 2 ranks x 16 clips left 3 over: they joined the last step, a rank got 18 clips, and
    the pipelines, built for 17, crashed at the end of every epoch. Now 2 epochs make 2 full steps of 32 clips."""
    data = DATA.model_copy(update={"batch_size": 16})
    loaders = [_loader(shards_of_35, rank=r, world=2, epochs=2, data=data, modalities=("rgb",)) for r in range(2)]
    per_rank = [list(loader.batches()) for loader in loaders]
    assert [[len(b.labels) for b in batches] for batches in per_rank] == [[16, 16]] * 2
    seen = [_epoch_keys(loader, batches) for loader, batches in zip(loaders, per_rank)]
    assert sorted(seen[0][0] + seen[1][0]) == sorted(loaders[0].table.keys)  # epoch 0 whole, in steps 1 and 2
    assert len(set(seen[0][1] + seen[1][1])) == 70 - 35 - 6  # epoch 1 opened step 2; 6 clips are left over
    for loader in loaders:
        loader.close()
    val = [_loader(shards_of_35, split="train", rank=r, world=2, train=False, data=data, modalities=("rgb",))
           for r in range(2)]  # scoring reads every video of an epoch once: 32, then 3 over the 2 ranks
    assert [[len(b.labels) for b in loader.epoch(0)] for loader in val] == [[16, 2], [16, 1]]
    for loader in val:
        loader.close()


def test_evaluation_reads_every_view_of_every_video_once_across_ranks(tiny_shards):
    data = DATA.model_copy(update={"eval_clips": 2, "eval_crops": 3})
    loaders = [_loader(tiny_shards, split="val", rank=r, world=2, train=False, data=data) for r in range(2)]
    seen = [(int(s), int(v)) for loader in loaders for b in loader.epoch(0) for s, v in zip(b.samples, b.views)]
    assert sorted(seen) == [(s, v) for s in range(len(loaders[0].table)) for v in range(6)]
    for loader in loaders:
        loader.close()


def _assert_same_batches(got, want) -> None:
    assert len(got) == len(want)
    for step, (got_batch, want_batch) in enumerate(zip(got, want)):
        for name in got_batch._fields:
            assert torch.equal(getattr(got_batch, name), getattr(want_batch, name)), f"step {step}: {name}"


@pytest.mark.parametrize("pipelines", [2, 3])
@pytest.mark.parametrize("split", ["train", "val"])
def test_several_pipelines_a_rank_deliver_the_batches_one_pipeline_does(tiny_shards, pipelines, split):
    def batches(data):
        loader = _loader(tiny_shards, split=split, train=split == "train", epochs=2,
                         data=data.model_copy(update={"eval_clips": 2}))
        read = list(loader.batches())
        state = loader.state()
        loader.close()
        return read, state

    one, one_state = batches(DATA)
    several, several_state = batches(DATA.model_copy(update={"pipelines": pipelines, "reader_threads": 2}))
    assert len(one) > 2 * pipelines  # every pipeline delivers more than its prefetched batches
    _assert_same_batches(several, one)
    assert several_state == one_state


def test_whole_epochs_must_be_read_in_order_and_training_windows_are_not_read_by_epoch(tiny_shards):
    loader = _loader(tiny_shards, epochs=2, whole_epochs=True)
    with pytest.raises(ValueError, match="epoch 1 requested; the loader is at epoch 0"):
        next(loader.epoch(1))
    loader.close()
    loader = _loader(tiny_shards, epochs=2)
    with pytest.raises(TypeError, match="span epochs: read them with batches()"):
        next(loader.epoch(0))
    loader.close()


def _interrupted(shards, world, stop_after, resumed_world, epochs=2, pipelines=1, resumed_pipelines=1):
    """Keys read before an interruption after `stop_after` steps, and after resuming on `resumed_world` ranks."""
    loaders = [_loader(shards, rank=r, world=world, epochs=epochs, data=DATA.model_copy(update={"pipelines": pipelines}))
               for r in range(world)]
    before = []
    for batches in itertools.islice(zip(*(loader.batches() for loader in loaders)), stop_after):
        before.append([key for loader, b in zip(loaders, batches) for key in _keys(loader, [b])])
    states = {loader.state() for loader in loaders}
    assert len(states) == 1
    state = LoaderState.from_dict(states.pop().to_dict())
    for loader in loaders:
        loader.close()
    resumed = [_loader(shards, rank=r, world=resumed_world, epochs=epochs, resume=state,
                       data=DATA.model_copy(update={"pipelines": resumed_pipelines}))
               for r in range(resumed_world)]
    after = []
    for batches in zip(*(loader.batches() for loader in resumed)):
        after.append([key for loader, b in zip(resumed, batches) for key in _keys(loader, [b])])
    for loader in resumed:
        loader.close()
    return before, after


@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_a_resumed_loader_continues_with_the_next_unseen_samples_in_the_same_order(tiny_shards, stop_after):
    uninterrupted, rest = _interrupted(tiny_shards, 2, 10**6, 2)
    assert rest == []
    before, after = _interrupted(tiny_shards, 2, stop_after, 2)
    assert before + after == uninterrupted


@pytest.mark.parametrize("pipelines, resumed_pipelines", [(2, 2), (3, 1), (1, 2)])
def test_a_loader_of_several_pipelines_stops_and_resumes_where_one_pipeline_would(tiny_shards, pipelines,
                                                                                   resumed_pipelines):
    uninterrupted, _ = _interrupted(tiny_shards, 2, 10**6, 2)
    before, after = _interrupted(tiny_shards, 2, 5, 2, pipelines=pipelines, resumed_pipelines=resumed_pipelines)
    assert before + after == uninterrupted


def test_resuming_on_another_number_of_ranks_reads_the_rest_of_the_stream_in_full_steps(tiny_shards):
    stream, _ = _interrupted(tiny_shards, 1, 10**6, 1)  # one rank reads the stream in its order, 2 clips a step
    stream = [key for step in stream for key in step]
    before, after = _interrupted(tiny_shards, 2, 2, 3)  # 8 of epoch 0's 12 clips, then windows of 6
    assert [len(step) for step in after] == [6, 6]  # 16 clips left: 2 full steps, 4 of epoch 1 not read
    assert sorted(k for step in before for k in step) == sorted(stream[:8])
    assert sorted(k for step in after for k in step) == sorted(stream[8:20])


def test_resuming_on_changed_shards_is_refused(tiny_shards):
    loader = _loader(tiny_shards)
    state = LoaderState(0, 2, 0, "0123456789abcdef")
    loader.close()
    with pytest.raises(ValueError, match="shards changed since the checkpoint"):
        _loader(tiny_shards, resume=state)


@pytest.mark.parametrize("pipelines", [1, 2])
def test_a_corrupt_sample_is_skipped_named_and_counted_and_nothing_else_is_lost(tiny_shards, tmp_path, capfd,
                                                                                pipelines):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = Manifest.load(shards)
    loader = _loader(shards, modalities=("rgb",))
    victim = 3
    member = loader.table.members[victim][RGB_EXT]
    tar = loader.table.tars[member.tar]
    loader.close()
    with open(tar, "r+b") as handle:  # same length, so every offset in the index still holds
        handle.seek(member.offset)
        handle.write(b"\x00garbage" * (member.size // 8))
    loader = _loader(shards, modalities=("rgb", "flow"), epochs=2, data=DATA.model_copy(update={"pipelines": pipelines}))
    victim_key = loader.table.keys[victim]
    for keys in _epoch_keys(loader, list(loader.batches())).values():
        assert sorted(keys) == sorted(k for k in loader.table.keys if k != victim_key)
    assert loader.skipped == [{"key": victim_key, "shard": manifest.splits["train"].shards[member.tar].path,
                               "modality": "rgb", "error": loader.skipped[0]["error"]}]
    loader.close()
    assert f"skipping corrupt sample {victim_key} (rgb)" in capfd.readouterr().err


def test_each_batch_is_told_to_on_plan_before_it_is_handed_out(tiny_shards):
    """The student reads its stored teacher outputs ahead from what `on_plan` is told."""
    told = []
    loader = _loader(tiny_shards, epochs=2, on_plan=lambda epochs, samples: told.append((epochs.tolist(),
                                                                                        samples.tolist())))
    for step, batch in enumerate(loader.batches()):
        assert told[step] == (batch.epochs.tolist(), batch.samples.tolist())
    loader.close()
    assert len(told) == step + 1


def test_shards_are_read_ahead_on_a_reader_thread_not_on_the_thread_that_runs_the_pipeline(tiny_shards):
    loader = _loader(tiny_shards, epochs=2)
    read, threads = loader.table.read, set()

    def recording(sample, ext):
        threads.add(threading.current_thread())
        return read(sample, ext)

    loader.table.read = recording
    steps = loader.steps_left()
    batches = list(loader.batches())
    loader.close()
    assert len(batches) == steps > 0 and threads
    assert threading.current_thread() not in threads and all(t.name.startswith("shard-reader") for t in threads)
    assert not any(t.is_alive() for t in threads)  # closing the loader ends its reader


@pytest.mark.parametrize("pipelines", [1, 2])
def test_a_sample_that_cannot_be_read_is_skipped_named_and_counted_and_nothing_else_is_lost(tiny_shards, capfd,
                                                                                            pipelines):
    loader = _loader(tiny_shards, modalities=("rgb",), epochs=2, data=DATA.model_copy(update={"pipelines": pipelines}))
    victim, read = 3, loader.table.read

    def failing(sample, ext):  # on the reader thread, a batch or two ahead of the one DALI decodes
        if sample == victim and ext == RGB_EXT:
            raise OSError("truncated member")
        return read(sample, ext)

    loader.table.read = failing
    victim_key = loader.table.keys[victim]
    for keys in _epoch_keys(loader, list(loader.batches())).values():
        assert sorted(keys) == sorted(k for k in loader.table.keys if k != victim_key)
    assert [(r["key"], r["modality"], r["error"]) for r in loader.skipped] == [(victim_key, "rgb", "truncated member")]
    loader.close()
    assert f"skipping corrupt sample {victim_key} (rgb)" in capfd.readouterr().err


def _failing(monkeypatch, call: str, tar: Path, code: int, times: int | None = None) -> list[str]:
    """`os.open` or `os.pread` fail with `code` on the shard `tar`, its first `times` times (None: every time)."""
    real, failures = getattr(os, call), []

    def failing(target, *args, **kwargs):
        path = target if call == "open" else os.readlink(f"/proc/self/fd/{target}")
        if os.path.realpath(path) == os.path.realpath(tar) and (times is None or len(failures) < times):
            failures.append(path)
            raise OSError(code, os.strerror(code))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(index.os, call, failing)
    return failures


@pytest.mark.parametrize("call, code", [("pread", errno.EIO), ("open", errno.EMFILE)])
def test_a_shard_the_os_keeps_failing_to_read_fails_the_step_naming_it_and_no_sample_is_skipped(tiny_shards,
                                                                                                 monkeypatch, call,
                                                                                                 code):
    loader = _loader(tiny_shards, modalities=("rgb",))
    tar = loader.table.tars[loader.table.members[3][RGB_EXT].tar]
    failures = _failing(monkeypatch, call, tar, code)
    with pytest.raises(ShardReadError, match=re.escape(str(tar))) as raised:
        list(loader.batches())
    assert raised.value.errno == code and len(failures) >= 3
    assert loader.skipped == [] and loader.skipped_samples == []
    loader.close()


def _epoch(loader) -> list:
    batches = list(loader.batches())
    loader.close()
    return batches


@pytest.mark.parametrize("call, code", [("pread", errno.ESTALE), ("open", errno.EMFILE)])
def test_an_os_read_error_that_passes_is_retried_and_the_batches_are_the_undisturbed_ones(tiny_shards, monkeypatch,
                                                                                         call, code):
    undisturbed = _epoch(_loader(tiny_shards))
    loader = _loader(tiny_shards)
    failures = _failing(monkeypatch, call, loader.table.tars[loader.table.members[3][RGB_EXT].tar], code, times=1)
    disturbed = _epoch(loader)
    assert len(failures) == 1 and loader.skipped == []
    assert len(disturbed) == len(undisturbed)
    for got, want in zip(disturbed, undisturbed):
        for name in ("rgb", "flow", "labels", "samples", "views"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_batch_labels_are_pinned_only_for_a_gpu_and_reach_the_cpu_unchanged(tiny_shards):
    from d3d_cluster.data.pipeline import pins, to_device

    loader = _loader(tiny_shards, modalities=("flow",))
    batch = next(loader.batches())
    loader.close()
    assert not pins(torch.device("cpu")) and pins(torch.device("cuda", 0))
    assert not batch.labels.is_pinned() and to_device(batch.labels, torch.device("cpu")) is batch.labels


def test_a_missing_shard_is_an_error_naming_it_before_anything_is_read(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    missing = shards / Manifest.load(shards).splits["val"].shards[0].path
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _loader(shards, split="val", train=False)


def _decode(loader, views: list[View], resize: bool = False):
    planned = _Planned([0] * len(views), (0, 0), [0] * len(views), [0] * len(views))
    loader._view = lambda epoch, sample, view, _views=iter(views * 2): next(_views)
    loader.resizes = resize
    columns = loader.columns(planned)
    pipe = _build_pipeline(lambda: columns, loader.geometry, loader.modalities, len(views), 1, None, 0, resize)
    _, _, _, rgb, flow = pipe.run()
    return _to_torch(rgb, torch.device("cpu")), _to_torch(flow, torch.device("cpu"))


def _stored_flow(loader, sample=0) -> np.ndarray:
    with av.open(io.BytesIO(loader.table.read(sample, FLOW_EXT).tobytes())) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frame_to_flow(frames).astype(np.float32) / 127.5 - 1.0  # (F, H, W, 2)


@pytest.mark.parametrize("resize", [False, True])
def test_mirroring_flips_rgb_and_flow_alike_and_negates_flow_x(tiny_shards, resize):
    loader = _loader(tiny_shards)
    plain, mirrored = View(1, 4, 3, 24, 24, False), View(1, 4, 3, 24, 24, True)
    rgb, flow = _decode(loader, [plain, mirrored], resize)
    assert torch.equal(rgb[1], rgb[0].flip(-1))
    assert torch.equal(flow[1, 1], flow[0, 1].flip(-1))
    assert torch.equal(flow[1, 0], -flow[0, 0].flip(-1))
    assert flow[0].abs().max() > 0.05
    loader.close()


@pytest.mark.parametrize("resize", [False, True])
@pytest.mark.parametrize("top, left", [(-1, 0), (3, 5)])
def test_flow_clip_is_the_stored_flow_at_the_chosen_start_stride_and_box(tiny_shards, resize, top, left):
    loader = _loader(tiny_shards, data=DATA.model_copy(update={"clip_frames": 4, "frame_stride": 2}))
    top = loader.geometry.height - 24 if top < 0 else top
    _, flow = _decode(loader, [View(2, top, left, 24, 24, False)], resize)
    stored = _stored_flow(loader)[2:10:2, top:top + 24, left:left + 24]
    decoded = flow[0].permute(1, 2, 3, 0).numpy()
    assert decoded.shape == stored.shape
    assert np.abs(decoded - stored).max() < 3 / 127.5
    loader.close()


def test_an_enlarged_box_scales_flow_with_it(tiny_shards):
    loader = _loader(tiny_shards)
    _, flow = _decode(loader, [View(1, 4, 4, 12, 12, False)], resize=True)  # 12x12 box resized to 24x24: motion x2
    stored = _stored_flow(loader)[1:9, 4:16, 4:16]
    decoded = flow[0].permute(1, 2, 3, 0).numpy()
    assert np.abs(stored).mean() > 0.01
    assert decoded.mean(axis=(1, 2)) == pytest.approx(2 * stored.mean(axis=(1, 2)), abs=0.02)
    loader.close()


LENGTHS = (30, 64, 250)  # RGB frames of the three videos of each split


def _counting_video(frames: int) -> np.ndarray:
    """Frame i of a flat colour that spells i: red and green in steps of 16 (the codecs move a level or two)."""
    i = np.arange(frames)
    video = np.full((frames, 32, 32, 3), 128, np.uint8)
    video[..., 0] = (16 * (i // 16) + 8)[:, None, None]
    video[..., 1] = (16 * (i % 16) + 8)[:, None, None]
    return video


def _frame_numbers(rgb: torch.Tensor) -> list[int]:
    """The frame each of a normalised (3, T, S, S) clip's frames was cut from."""
    from d3d_cluster.data.pipeline import RGB_MEAN, RGB_STD

    levels = rgb.mean(dim=(2, 3)) * torch.tensor(RGB_STD)[:, None] + torch.tensor(RGB_MEAN)[:, None]
    return [16 * round((float(r) - 8) / 16) + round((float(g) - 8) / 16) for r, g in zip(levels[0], levels[1])]


@pytest.fixture(scope="module")
def mixed_length_shards(tmp_path_factory) -> Path:
    from dataprep.prepare import prepare_dataset
    from dataprep.sources.labels_csv import read_labels_csv
    from dataprep.video import write_h264

    from d3d_cluster.spec import PrepSpec

    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("mixed")
    prep = PrepSpec(short_side=32, flow={"algorithm": "farneback"}, shard_samples=2)
    rows = []
    for split in ("train", "val"):
        for label, frames in zip("abc", LENGTHS):
            write_h264(raw / f"{split}_{frames}.mp4", _counting_video(frames), prep.fps)
            rows.append(f"{split}_{frames}.mp4,{label},{split}\n")
    (raw / "labels.csv").write_text("path,label,split\n" + "".join(rows))
    prepare_dataset(prep, read_labels_csv(raw / "labels.csv"), out, progress=False, min_frames=DATA.clip_span)
    return out


def test_each_video_keeps_its_own_length_in_the_manifest(mixed_length_shards):
    manifest = Manifest.load(mixed_length_shards)
    assert manifest.min_frames == 30
    loader = _loader(mixed_length_shards)
    assert sorted(loader.table.frames) == sorted(LENGTHS)
    stored = [json.loads(loader.table.read(s, "json").tobytes())["frames"] for s in range(len(loader.table))]
    assert list(loader.table.frames) == stored  # the manifest's counts follow the index's order
    loader.close()


def test_training_clips_start_anywhere_in_each_video_and_are_decoded_from_there(mixed_length_shards):
    loader = _loader(mixed_length_shards, epochs=3, whole_epochs=True)
    span = (DATA.clip_frames - 1) * DATA.frame_stride
    for sample, frames in enumerate(loader.table.frames):
        starts = {loader._view(epoch, sample, 0).start for epoch in range(12 * frames)}
        assert starts == set(range(frames - 1 - span)), frames  # the last clip ends before the last flow frame
    for epoch in range(3):
        batches = list(loader.epoch(epoch))
        assert sorted(_keys(loader, batches)) == sorted(loader.table.keys)  # every video once an epoch
        for batch in batches:
            for rgb, sample in zip(batch.rgb, batch.samples):
                start = loader._view(epoch, int(sample), 0).start
                assert _frame_numbers(rgb) == list(range(start, start + span + 1))
    loader.close()


def _frames_of(stream: np.ndarray) -> list[np.ndarray]:
    with av.open(io.BytesIO(stream.tobytes())) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("start", [203, 232])
def test_a_late_clip_reaches_dali_as_its_stream_from_the_keyframe_before_its_start(mixed_length_shards, start):
    """DALI's CPU decoder would decode every frame before the start (BENCHMARKS): it is handed the frames from the
    keyframe before the start through the clip's last, and the start counted from that keyframe."""
    loader = _loader(mixed_length_shards)
    interval = Manifest.load(mixed_length_shards).keyframe_interval
    keyframe, last = start - start % interval, start + (DATA.clip_frames - 1) * DATA.frame_stride
    loader._view = lambda epoch, sample, view: View(start, 0, 0, 24, 24, False)
    columns = loader.columns(_Planned([0], (0, 0), [list(loader.table.frames).index(250)], [0]))
    rgb, flow = (column[0] for column in columns if column[0].dtype == np.uint8)  # the encoded streams
    assert [len(_frames_of(stream)) for stream in (rgb, flow)] == [last + 1 - keyframe] * 2
    assert [int(columns[i][0]) for i in (-4, -2)] == [start - keyframe] * 2  # each stream's start, before it
    levels = [frame.mean(axis=(0, 1)) for frame in _frames_of(rgb)]
    assert [16 * round((r - 8) / 16) + round((g - 8) / 16) for r, g, _ in levels] == list(range(keyframe, last + 1))
    loader.close()


def test_evaluation_views_of_a_long_video_are_spread_across_it(mixed_length_shards):
    data = DATA.model_copy(update={"eval_clips": 10, "eval_crops": 1})
    loader = _loader(mixed_length_shards, split="val", train=False, data=data, modalities=("rgb",))
    firsts = {}
    for batch in loader.epoch(0):
        for rgb, sample, view in zip(batch.rgb, batch.samples, batch.views):
            firsts[loader.table.frames[int(sample)], int(view)] = _frame_numbers(rgb)[0]
    span = DATA.clip_frames - 1
    for frames in LENGTHS:
        last = frames - 2 - span
        assert [firsts[frames, v] for v in range(10)] == [round(v * last / 9) for v in range(10)]
    loader.close()


def _sliding_video(direction: int, rng: np.random.Generator) -> np.ndarray:
    """A textured frame sliding 2 pixels a frame to the right (direction 1) or to the left (-1)."""
    texture = rng.integers(0, 256, (32, 96), dtype=np.uint8)
    texture = np.kron(texture[::4, ::4], np.ones((4, 4), np.uint8))  # blocks of 4 px: flow finds them
    frames = [np.roll(texture, 2 * direction * t, axis=1)[:, 32:64] for t in range(12)]
    return np.repeat(np.stack(frames)[..., None], 3, axis=3)


@pytest.fixture(scope="module")
def left_right_shards(tmp_path_factory) -> Path:
    from dataprep.prepare import prepare_dataset
    from dataprep.sources.labels_csv import read_labels_csv
    from dataprep.video import write_h264

    from d3d_cluster.spec import PrepSpec

    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("left-right")
    prep = PrepSpec(short_side=32, flow={"algorithm": "farneback"}, shard_samples=8)
    rng, rows = np.random.default_rng(0), ["path,label,split\n"]
    for number in range(16):
        label, direction = ("left", -1) if number % 2 else ("right", 1)
        write_h264(raw / f"{number}.mp4", _sliding_video(direction, rng), prep.fps)
        rows.append(f"{number}.mp4,{label},{'train' if number < 12 else 'val'}\n")
    (raw / "labels.csv").write_text("".join(rows))
    prepare_dataset(prep, read_labels_csv(raw / "labels.csv"), out, progress=False, min_frames=DATA.clip_span)
    return out


@pytest.mark.parametrize("mirror, pairs, separable", [(False, [], True), (True, [["left", "right"]], True),
                                                      (True, [], False)])
def test_left_and_right_classes_stay_apart_without_mirroring_or_with_their_pair_swapped(left_right_shards, mirror,
                                                                                        pairs, separable):
    """The direction of a clip's flow tells its label exactly unless clips are mirrored with their labels kept."""
    data = DATA.model_copy(update={"mirror": mirror, "mirror_pairs": pairs})
    loader = _loader(left_right_shards, data=data, modalities=("flow",), epochs=4)
    right = Manifest.load(left_right_shards).classes.index("right")
    agree = [(float(flow[0].mean()) > 0) == (int(label) == right)
             for batch in loader.batches() for flow, label in zip(batch.flow, batch.labels)]
    loader.close()
    share = sum(agree) / len(agree)
    assert len(agree) == 48
    assert (share == 1.0) if separable else (0.25 < share < 0.75), share


@pytest.mark.parametrize("side, decoder, on_gpu", [(128, "auto", True), (256, "gpu", True), (112, "auto", False),
                                                   (256, "cpu", False), (64, "cpu", False)])
def test_a_gpu_rank_decodes_with_nvdec_where_the_frames_and_data_decoder_allow(side, decoder, on_gpu):
    manifest = SimpleNamespace(height=side, width=2 * side)
    assert decodes_on_gpu(manifest, "shards", DATA.model_copy(update={"decoder": decoder})) is on_gpu


def test_mirror_pairs_naming_an_unknown_class_are_refused_naming_it(left_right_shards):
    data = DATA.model_copy(update={"mirror_pairs": [["left", "up"]]})
    with pytest.raises(ValueError, match="data.mirror_pairs: 'up' is not a class of .*classes: left, right"):
        _loader(left_right_shards, data=data)

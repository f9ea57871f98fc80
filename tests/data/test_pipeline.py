import io
import shutil
import threading

import av
import numpy as np
import pytest
import torch

from d3d_cluster.data.order import View
from d3d_cluster.data.pipeline import ClipLoader, LoaderState, _Planned, _build_pipeline, _to_torch
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
    batch = next(loader.epoch(0))
    assert batch.rgb.shape == (2, 3, 8, 24, 24) and batch.rgb.dtype == torch.float32
    assert batch.flow.shape == (2, 2, 8, 24, 24)
    assert batch.flow.abs().max() <= (1.0 if crop_area is None else 1.0 / 0.3)
    assert batch.labels.tolist() == [loader.table.label(int(s)) for s in batch.samples]
    loader.close()


def test_one_modality_decodes_only_that_one(tiny_shards):
    loader = _loader(tiny_shards, modalities=("flow",))
    batch = next(loader.epoch(0))
    assert batch.rgb is None and batch.flow.shape[1] == 2
    loader.close()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_world_reads_every_training_sample_once_per_epoch_in_equal_steps(tiny_shards, world):
    loaders = [_loader(tiny_shards, rank=r, world=world, epochs=2) for r in range(world)]
    for epoch in range(2):
        per_rank = [list(loader.epoch(epoch)) for loader in loaders]
        assert len({len(batches) for batches in per_rank}) == 1
        seen = [key for loader, batches in zip(loaders, per_rank) for key in _keys(loader, batches)]
        assert sorted(seen) == sorted(loaders[0].table.keys)
    for loader in loaders:
        loader.close()


def test_evaluation_reads_every_view_of_every_video_once_across_ranks(tiny_shards):
    data = DATA.model_copy(update={"eval_clips": 2, "eval_crops": 3})
    loaders = [_loader(tiny_shards, split="val", rank=r, world=2, train=False, data=data) for r in range(2)]
    seen = [(int(s), int(v)) for loader in loaders for b in loader.epoch(0) for s, v in zip(b.samples, b.views)]
    assert sorted(seen) == [(s, v) for s in range(len(loaders[0].table)) for v in range(6)]
    for loader in loaders:
        loader.close()


def test_epochs_must_be_read_in_order(tiny_shards):
    loader = _loader(tiny_shards, epochs=2)
    with pytest.raises(ValueError, match="epoch 1 requested; the loader is at epoch 0"):
        next(loader.epoch(1))
    loader.close()


def _interrupted(shards, world, stop_after, resumed_world, epochs=2):
    """Keys read before an interruption after `stop_after` steps, and after resuming on `resumed_world` ranks."""
    loaders = [_loader(shards, rank=r, world=world, epochs=epochs) for r in range(world)]
    before, steps = [], 0
    for epoch in range(epochs):
        iterators = [loader.epoch(epoch) for loader in loaders]
        for batches in zip(*iterators):
            before.append([key for loader, b in zip(loaders, batches) for key in _keys(loader, [b])])
            steps += 1
            if steps == stop_after:
                break
        if steps == stop_after:
            break
    states = {loader.state() for loader in loaders}
    assert len(states) == 1
    state = LoaderState.from_dict(states.pop().to_dict())
    for loader in loaders:
        loader.close()
    resumed = [_loader(shards, rank=r, world=resumed_world, epochs=epochs, resume=state)
               for r in range(resumed_world)]
    after = []
    for epoch in range(state.epoch, epochs):
        for batches in zip(*(loader.epoch(epoch) for loader in resumed)):
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


def test_resuming_on_another_number_of_ranks_reads_every_remaining_sample_once(tiny_shards):
    uninterrupted, _ = _interrupted(tiny_shards, 2, 10**6, 2)
    before, after = _interrupted(tiny_shards, 2, 2, 3)  # mid-epoch 0 of 2
    per_epoch = len(uninterrupted) // 2
    remaining_epoch0 = sorted(k for step in uninterrupted[2:per_epoch] for k in step)
    assert before == uninterrupted[:2]
    resumed_keys = [k for step in after for k in step]
    epoch0_rest = len(remaining_epoch0)
    assert sorted(resumed_keys[:epoch0_rest]) == remaining_epoch0
    assert sorted(resumed_keys[epoch0_rest:]) == sorted(k for step in uninterrupted[per_epoch:] for k in step)


def test_resuming_on_changed_shards_is_refused(tiny_shards):
    loader = _loader(tiny_shards)
    state = LoaderState(0, 2, 0, "0123456789abcdef")
    loader.close()
    with pytest.raises(ValueError, match="shards changed since the checkpoint"):
        _loader(tiny_shards, resume=state)


def test_a_corrupt_sample_is_skipped_named_and_counted_and_nothing_else_is_lost(tiny_shards, tmp_path, capfd):
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
    loader = _loader(shards, modalities=("rgb", "flow"), epochs=2)
    victim_key = loader.table.keys[victim]
    for epoch in range(2):
        keys = _keys(loader, list(loader.epoch(epoch)))
        assert sorted(keys) == sorted(k for k in loader.table.keys if k != victim_key)
    assert loader.skipped == [{"key": victim_key, "shard": manifest.splits["train"].shards[member.tar].path,
                               "modality": "rgb", "error": loader.skipped[0]["error"]}]
    loader.close()
    assert f"skipping corrupt sample {victim_key} (rgb)" in capfd.readouterr().err


def test_shards_are_read_ahead_on_a_reader_thread_not_on_the_thread_that_runs_the_pipeline(tiny_shards):
    loader = _loader(tiny_shards, epochs=2)
    read, threads = loader.table.read, set()

    def recording(sample, ext):
        threads.add(threading.current_thread())
        return read(sample, ext)

    loader.table.read = recording
    batches = [b for epoch in range(2) for b in loader.epoch(epoch)]
    loader.close()
    assert len(batches) == 2 * len(loader) and threads
    assert threading.current_thread() not in threads and all(t.name.startswith("shard-reader") for t in threads)
    assert not any(t.is_alive() for t in threads)  # closing the loader ends its reader


def test_a_sample_that_cannot_be_read_is_skipped_named_and_counted_and_nothing_else_is_lost(tiny_shards, capfd):
    loader = _loader(tiny_shards, modalities=("rgb",), epochs=2)
    victim, read = 3, loader.table.read

    def failing(sample, ext):  # on the reader thread, a batch or two ahead of the one DALI decodes
        if sample == victim and ext == RGB_EXT:
            raise OSError("truncated member")
        return read(sample, ext)

    loader.table.read = failing
    victim_key = loader.table.keys[victim]
    for epoch in range(2):
        keys = _keys(loader, list(loader.epoch(epoch)))
        assert sorted(keys) == sorted(k for k in loader.table.keys if k != victim_key)
    assert [(r["key"], r["modality"], r["error"]) for r in loader.skipped] == [(victim_key, "rgb", "truncated member")]
    loader.close()
    assert f"skipping corrupt sample {victim_key} (rgb)" in capfd.readouterr().err


def test_batch_labels_are_pinned_only_for_a_gpu_and_reach_the_cpu_unchanged(tiny_shards):
    from d3d_cluster.data.pipeline import pins, to_device

    loader = _loader(tiny_shards, modalities=("flow",))
    batch = next(loader.epoch(0))
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
    planned = _Planned(0, 0, [0] * len(views), [0] * len(views))
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

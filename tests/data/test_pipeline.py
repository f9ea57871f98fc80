import numpy as np
import pytest
import torch

from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.order import View
from d3d_cluster.data.pipeline import ClipLoader, ClipShape, _BatchSource, _build_pipeline, _to_torch
from d3d_cluster.data.schema import FLOW_EXT, Manifest, frame_to_flow

CLIP = dict(clip_frames=8, crop_size=24, batch_size=2, seed=0)


def _loader(shards, split="train", rank=0, world=1, train=True, epochs=1, modalities=("rgb", "flow")):
    return ClipLoader(shards, split, modalities=modalities, rank=rank, world=world, train=train, epochs=epochs, **CLIP)


def test_batches_carry_rgb_and_flow_clips_with_their_labels(tiny_shards):
    loader = _loader(tiny_shards)
    batch = next(loader.epoch(0))
    assert batch.rgb.shape == (2, 3, 8, 24, 24) and batch.rgb.dtype == torch.float32
    assert batch.flow.shape == (2, 2, 8, 24, 24)
    assert batch.flow.abs().max() <= 1.0
    assert batch.labels.tolist() == [loader.table.label(int(s)) for s in batch.samples]
    loader.close()


def test_one_modality_decodes_only_that_one(tiny_shards):
    loader = _loader(tiny_shards, modalities=("flow",))
    batch = next(loader.epoch(0))
    assert batch.rgb is None and batch.flow.shape[1] == 2
    loader.close()


def test_two_ranks_read_disjoint_equal_shares_each_epoch(tiny_shards):
    loaders = [_loader(tiny_shards, rank=r, world=2, epochs=2) for r in range(2)]
    for epoch in range(2):
        seen = [[int(s) for b in loader.epoch(epoch) for s in b.samples] for loader in loaders]
        assert len(seen[0]) == len(seen[1]) > 0
        assert not set(seen[0]) & set(seen[1])
    for loader in loaders:
        loader.close()


def test_evaluation_on_two_ranks_covers_every_validation_sample(tiny_shards):
    loaders = [_loader(tiny_shards, split="val", rank=r, world=2, train=False) for r in range(2)]
    seen = {int(s) for loader in loaders for b in loader.epoch(0) for s in b.samples}
    assert seen == set(range(len(loaders[0].table)))


def test_epochs_must_be_read_in_order(tiny_shards):
    loader = _loader(tiny_shards, epochs=2)
    with pytest.raises(ValueError, match="epoch 1 requested; the loader is at epoch 0"):
        next(loader.epoch(1))
    loader.close()


def _views_of_one_sample(shards, views):
    manifest = Manifest.load(shards)
    table = SampleTable(*manifest.shard_paths(shards, "train"))
    shape = ClipShape(8, 24, manifest.frames, manifest.height, manifest.width)
    plan = iter([(0, np.array([0] * len(views)), views)])
    pipe = _build_pipeline(_BatchSource(table, ("rgb", "flow"), plan), shape, ("rgb", "flow"), len(views), 1, None, 0)
    _, _, rgb, flow = pipe.run()
    return table, manifest, _to_torch(rgb, torch.device("cpu")), _to_torch(flow, torch.device("cpu"))


def test_mirroring_flips_rgb_and_flow_alike_and_negates_flow_x(tiny_shards):
    plain, mirrored = View(1, 0.5, 0.5, False), View(1, 0.5, 0.5, True)
    _, _, rgb, flow = _views_of_one_sample(tiny_shards, [plain, mirrored])
    assert torch.equal(rgb[1], rgb[0].flip(-1))
    assert torch.equal(flow[1, 1], flow[0, 1].flip(-1))
    assert torch.equal(flow[1, 0], -flow[0, 0].flip(-1))
    assert flow[0].abs().max() > 0.05


def test_flow_clip_is_the_stored_flow_at_the_chosen_start_and_crop(tiny_shards):
    table, manifest, _, flow = _views_of_one_sample(tiny_shards, [View(2, 0.0, 1.0, False)])
    import av, io

    with av.open(io.BytesIO(table.read(0, FLOW_EXT).tobytes())) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    stored = frame_to_flow(frames)[2:10, manifest.height - 24:, :24].astype(np.float32) / 127.5 - 1.0
    decoded = flow[0].permute(1, 2, 3, 0).numpy()
    assert decoded.shape == stored.shape
    assert np.abs(decoded - stored).max() < 3 / 127.5

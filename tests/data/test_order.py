import numpy as np
import pytest

from d3d_cluster.data.order import (Geometry, epoch_order, eval_views, global_steps, rank_steps, rank_windows,
                                    step_capacity, train_view, window_count)

GEOMETRY = Geometry(height=48, width=64, clip_frames=8, stride=2, crop=32)
FRAMES = 20  # RGB frames of the video the views are cut from


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    first = epoch_order(100, seed=1, epoch=0, shuffle=True)
    assert sorted(first) == list(range(100))
    assert np.array_equal(first, epoch_order(100, seed=1, epoch=0, shuffle=True))
    assert not np.array_equal(first, epoch_order(100, seed=1, epoch=1, shuffle=True))
    assert not np.array_equal(first, epoch_order(100, seed=2, epoch=0, shuffle=True))
    assert list(epoch_order(5, seed=1, epoch=3, shuffle=False)) == [0, 1, 2, 3, 4]


# Dataset sizes around every remainder a step can leave, world sizes from one rank to Kinetics' 64 x 8 GPUs.
ITEMS = [1, 2, 3, 5, 7, 16, 17, 33, 35, 64, 65, 97, 130, 255, 513]
WORLDS = [1, 2, 3, 5, 8, 16, 64, 512]
BATCHES = [1, 2, 3, 8, 16]


def _whole_epoch(items: int, world: int, batch: int, position: int = 0) -> list[list[tuple[np.ndarray, int]]]:
    order = epoch_order(items, seed=0, epoch=0, shuffle=True)
    return [rank_steps(order, position, rank, world, batch) for rank in range(world)]


def test_whole_epochs_of_every_size_read_each_item_once_in_the_same_steps_within_the_pipelines_capacity():
    for items in ITEMS:
        for world in (w for w in WORLDS if w <= items):
            for batch in BATCHES:
                for position in sorted({0, min(items // 3, items - world), items - world}):
                    per_rank = _whole_epoch(items, world, batch, position)
                    assert len({len(steps) for steps in per_rank}) == 1, (items, world, batch, position)
                    seen = np.concatenate([chunk for steps in per_rank for chunk, _ in steps] or [np.array([], int)])
                    order = epoch_order(items, seed=0, epoch=0, shuffle=True)
                    assert sorted(seen.tolist()) == sorted(order[position:].tolist()), (items, world, batch, position)
                    sizes = [len(chunk) for steps in per_rank for chunk, _ in steps]
                    assert all(1 <= size <= step_capacity(batch) for size in sizes), (items, world, batch, position)


@pytest.mark.parametrize("world, resumed_world", [(2, 2), (2, 3), (3, 1), (4, 2)])
def test_resuming_from_a_position_reads_exactly_the_items_not_yet_read(world, resumed_world):
    order = epoch_order(57, seed=3, epoch=2, shuffle=True)
    first = [rank_steps(order, 0, rank, world, 4) for rank in range(world)]
    read = np.concatenate([first[rank][i][0] for rank in range(world) for i in range(3)])
    position = first[0][2][1]
    assert position == len(read)
    rest = np.concatenate([chunk for rank in range(resumed_world)
                           for chunk, _ in rank_steps(order, position, rank, resumed_world, 4)])
    assert sorted(np.concatenate([read, rest]).tolist()) == list(range(57))
    if resumed_world == world:
        assert [c.tolist() for c, _ in rank_steps(order, position, 1, world, 4)] == \
            [c.tolist() for c, _ in first[1][3:]]


def test_fewer_items_than_ranks_is_refused():
    assert global_steps(0, 4, 2) == []
    with pytest.raises(ValueError, match="3 items cannot be shared among 4 ranks"):
        global_steps(3, 4, 2)


def _orders(items: int):
    return lambda epoch: epoch_order(items, seed=7, epoch=epoch, shuffle=True)


def _windows(items, epochs, world, batch, start=(0, 0)):
    """Every rank's windows from `start`: per step, the world's (epoch, item) pairs in stream order, and the end."""
    per_rank = [list(rank_windows(_orders(items), items, *start, epochs, rank, world, batch)) for rank in range(world)]
    steps = []
    for shares in zip(*per_rank, strict=True):
        assert len({end for _, _, end in shares}) == 1
        pairs = [None] * (world * batch)
        for rank, (epochs_of, chosen, _) in enumerate(shares):
            assert len(chosen) == len(epochs_of) == batch  # every step full, on every rank
            pairs[rank::world] = list(zip(epochs_of.tolist(), chosen.tolist()))
        steps.append((pairs, shares[0][2]))
    return steps


def test_training_windows_of_every_size_are_full_and_use_every_clip_once_per_epoch_in_order():
    for items in ITEMS:
        for world in WORLDS[:6]:
            for batch in BATCHES:
                epochs = 3
                steps = _windows(items, epochs, world, batch)
                window = world * batch
                assert len(steps) == window_count(items, 0, 0, epochs, world, batch) == epochs * items // window
                stream = [pair for pairs, _ in steps for pair in pairs]
                expected = [(e, int(i)) for e in range(epochs) for i in _orders(items)(e)]
                assert stream == expected[: len(stream)], (items, world, batch)  # the stream, in order
                assert len(expected) - len(stream) < window  # only the last epoch's short remainder is left out


@pytest.mark.parametrize("world, batch, resumed_world, resumed_batch", [(2, 16, 2, 16), (2, 16, 3, 8), (4, 3, 1, 5),
                                                                        (1, 7, 8, 2)])
def test_training_resumes_from_any_step_on_any_world_and_batch_with_the_rest_of_the_stream(world, batch,
                                                                                           resumed_world,
                                                                                           resumed_batch):
    items, epochs = 35, 4
    first = _windows(items, epochs, world, batch)
    expected = [(e, int(i)) for e in range(epochs) for i in _orders(items)(e)]
    for stop in range(len(first)):
        read = [pair for pairs, _ in first[: stop + 1] for pair in pairs]
        rest = [pair for pairs, _ in _windows(items, epochs, resumed_world, resumed_batch, first[stop][1])
                for pair in pairs]
        assert read + rest == expected[: len(read) + len(rest)]
        assert len(expected) - len(read) - len(rest) < resumed_world * resumed_batch


def test_plain_crops_are_reproducible_whole_pixel_boxes_inside_the_clip_range():
    views = [train_view(GEOMETRY, FRAMES, 0, 0, s, None, (0.75, 1.33)) for s in range(200)]
    assert views == [train_view(GEOMETRY, FRAMES, 0, 0, s, None, (0.75, 1.33)) for s in range(200)]
    assert {v.start for v in views} == set(range(GEOMETRY.max_start(FRAMES) + 1))
    assert GEOMETRY.max_start(FRAMES) + (GEOMETRY.clip_frames - 1) * GEOMETRY.stride == FRAMES - 2
    assert all(v.height == v.width == 32 and v.top == int(v.top) and v.left == int(v.left) for v in views)
    assert all(0 <= v.top <= 16 and 0 <= v.left <= 32 for v in views)
    assert 60 < sum(v.flip for v in views) < 140
    assert train_view(GEOMETRY, FRAMES, 0, 1, 5, None, (1, 1)) != train_view(GEOMETRY, FRAMES, 0, 0, 5, None, (1, 1))


@pytest.mark.parametrize("frames", [16, 30, 64, 250])
def test_training_starts_cover_each_videos_whole_range_whatever_its_length(frames):
    starts = {train_view(GEOMETRY, frames, 0, epoch, 3, None, (1, 1)).start for epoch in range(12 * frames)}
    assert starts == set(range(frames - 2 - 7 * 2 + 1))


def test_a_video_too_short_for_a_clip_is_refused_with_its_length():
    with pytest.raises(ValueError, match="a video of 15 frames cannot hold a 8-frame clip at stride 2"):
        train_view(GEOMETRY, 15, 0, 0, 0, None, (1, 1))


def test_resized_crops_cover_the_asked_area_and_aspect_and_stay_inside_the_frame():
    views = [train_view(GEOMETRY, FRAMES, 1, 0, s, (0.3, 0.8), (0.75, 4 / 3)) for s in range(300)]
    area = np.array([v.height * v.width / (48 * 64) for v in views])
    aspect = np.array([v.width / v.height for v in views])
    fitted = area < 0.8 + 1e-6  # a draw that never fits falls back to the largest square
    assert fitted.mean() > 0.9
    assert area[fitted].min() >= 0.3 - 1e-6 and area.max() > 0.7 and area.min() < 0.4
    assert aspect[fitted].min() >= 0.75 - 1e-6 and aspect[fitted].max() <= 4 / 3 + 1e-6
    assert all(v.top >= 0 and v.left >= 0 and v.top + v.height <= 48 + 1e-4 and v.left + v.width <= 64 + 1e-4
               for v in views)


def test_evaluation_views_spread_clips_over_the_video_and_crops_along_the_long_side():
    views = eval_views(GEOMETRY, FRAMES, clips=3, crops=3)
    last = GEOMETRY.max_start(FRAMES)
    assert len(views) == 9 and not any(v.flip for v in views)
    assert sorted({v.start for v in views}) == [0, last // 2, last]
    assert sorted({v.left for v in views}) == [0, 16, 32] and {v.top for v in views} == {8}
    portrait = Geometry(64, 48, 8, 1, 32)
    assert sorted({v.top for v in eval_views(portrait, FRAMES, 1, 3)}) == [0, 16, 32]
    centre = eval_views(GEOMETRY, FRAMES, clips=1, crops=1)
    assert [(v.start, v.top, v.left) for v in centre] == [(last // 2, 8, 16)]


def test_the_evaluation_clips_of_a_long_video_span_it_and_a_short_ones_fit_it():
    long, short = eval_views(GEOMETRY, 250, clips=10, crops=1), eval_views(GEOMETRY, 30, clips=10, crops=1)
    assert [v.start for v in long] == [round(i * 234 / 9) for i in range(10)]
    assert long[-1].start + 7 * 2 + 1 == 249  # the last clip ends where the video's last flow frame does
    assert [v.start for v in short] == [round(i * 14 / 9) for i in range(10)]

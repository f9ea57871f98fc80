import numpy as np
import pytest

from d3d_cluster.data.order import Geometry, epoch_order, eval_views, global_steps, rank_steps, train_view

GEOMETRY = Geometry(video_frames=20, height=48, width=64, clip_frames=8, stride=2, crop=32)


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    first = epoch_order(100, seed=1, epoch=0, shuffle=True)
    assert sorted(first) == list(range(100))
    assert np.array_equal(first, epoch_order(100, seed=1, epoch=0, shuffle=True))
    assert not np.array_equal(first, epoch_order(100, seed=1, epoch=1, shuffle=True))
    assert not np.array_equal(first, epoch_order(100, seed=2, epoch=0, shuffle=True))
    assert list(epoch_order(5, seed=1, epoch=3, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("items, world, batch", [(100, 2, 8), (101, 3, 4), (17, 4, 2), (7, 2, 8), (33, 2, 16),
                                                 (16, 16, 1), (49, 8, 3)])
def test_the_world_reads_every_item_once_in_equal_steps_of_at_most_one_extra_clip(items, world, batch):
    order = epoch_order(items, seed=0, epoch=0, shuffle=True)
    per_rank = [rank_steps(order, 0, rank, world, batch) for rank in range(world)]
    assert len({len(steps) for steps in per_rank}) == 1
    seen = np.concatenate([chunk for steps in per_rank for chunk, _ in steps])
    assert sorted(seen.tolist()) == list(range(items))
    assert all(1 <= len(chunk) <= batch + 1 for steps in per_rank for chunk, _ in steps)
    assert per_rank[0][-1][1] == items


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


@pytest.mark.parametrize("items, world, batch", [(11, 1, 2), (13, 2, 3), (31, 3, 4), (100, 2, 8)])
def test_training_steps_give_every_rank_at_least_two_clips(items, world, batch):
    order = epoch_order(items, seed=0, epoch=0, shuffle=True)
    per_rank = [rank_steps(order, 0, rank, world, batch, min_per_rank=2) for rank in range(world)]
    assert sorted(np.concatenate([c for steps in per_rank for c, _ in steps]).tolist()) == list(range(items))
    assert all(2 <= len(chunk) <= batch + 2 for steps in per_rank for chunk, _ in steps)


def test_fewer_items_than_ranks_is_refused():
    assert global_steps(0, 4, 2) == []
    with pytest.raises(ValueError, match="3 items cannot be shared among 4 ranks"):
        global_steps(3, 4, 2)


def test_plain_crops_are_reproducible_whole_pixel_boxes_inside_the_clip_range():
    views = [train_view(GEOMETRY, 0, 0, s, None, (0.75, 1.33)) for s in range(200)]
    assert views == [train_view(GEOMETRY, 0, 0, s, None, (0.75, 1.33)) for s in range(200)]
    assert {v.start for v in views} == set(range(GEOMETRY.max_start + 1))
    assert GEOMETRY.max_start + (GEOMETRY.clip_frames - 1) * GEOMETRY.stride == GEOMETRY.video_frames - 2
    assert all(v.height == v.width == 32 and v.top == int(v.top) and v.left == int(v.left) for v in views)
    assert all(0 <= v.top <= 16 and 0 <= v.left <= 32 for v in views)
    assert 60 < sum(v.flip for v in views) < 140
    assert train_view(GEOMETRY, 0, 1, 5, None, (1, 1)) != train_view(GEOMETRY, 0, 0, 5, None, (1, 1))


def test_resized_crops_cover_the_asked_area_and_aspect_and_stay_inside_the_frame():
    views = [train_view(GEOMETRY, 1, 0, s, (0.3, 0.8), (0.75, 4 / 3)) for s in range(300)]
    area = np.array([v.height * v.width / (48 * 64) for v in views])
    aspect = np.array([v.width / v.height for v in views])
    fitted = area < 0.8 + 1e-6  # a draw that never fits falls back to the largest square
    assert fitted.mean() > 0.9
    assert area[fitted].min() >= 0.3 - 1e-6 and area.max() > 0.7 and area.min() < 0.4
    assert aspect[fitted].min() >= 0.75 - 1e-6 and aspect[fitted].max() <= 4 / 3 + 1e-6
    assert all(v.top >= 0 and v.left >= 0 and v.top + v.height <= 48 + 1e-4 and v.left + v.width <= 64 + 1e-4
               for v in views)


def test_evaluation_views_spread_clips_over_the_video_and_crops_along_the_long_side():
    views = eval_views(GEOMETRY, clips=3, crops=3)
    assert len(views) == 9 and not any(v.flip for v in views)
    assert sorted({v.start for v in views}) == [0, GEOMETRY.max_start // 2, GEOMETRY.max_start]
    assert sorted({v.left for v in views}) == [0, 16, 32] and {v.top for v in views} == {8}
    portrait = Geometry(20, 64, 48, 8, 1, 32)
    assert sorted({v.top for v in eval_views(portrait, 1, 3)}) == [0, 16, 32]
    centre = eval_views(GEOMETRY, clips=1, crops=1)
    assert [(v.start, v.top, v.left) for v in centre] == [(GEOMETRY.max_start // 2, 8, 16)]

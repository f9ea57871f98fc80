import numpy as np
import pytest

from d3d_cluster.data.order import center_view, epoch_order, rank_batches, train_view


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    first = epoch_order(100, seed=1, epoch=0, shuffle=True)
    assert sorted(first) == list(range(100))
    assert np.array_equal(first, epoch_order(100, seed=1, epoch=0, shuffle=True))
    assert not np.array_equal(first, epoch_order(100, seed=1, epoch=1, shuffle=True))
    assert not np.array_equal(first, epoch_order(100, seed=2, epoch=0, shuffle=True))
    assert list(epoch_order(5, seed=1, epoch=3, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_samples, world, batch", [(100, 2, 8), (101, 3, 4), (17, 4, 2), (7, 2, 8)])
def test_training_gives_every_rank_the_same_full_batches_without_repeats(num_samples, world, batch):
    order = epoch_order(num_samples, seed=0, epoch=0, shuffle=True)
    per_rank = [rank_batches(order, rank, world, batch, drop_last=True) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = np.concatenate([b for batches in per_rank for b in batches] or [np.array([], int)])
    assert all(len(b) == batch for batches in per_rank for b in batches)
    assert len(seen) == len(set(seen.tolist()))
    assert num_samples - len(seen) < world * batch + world


@pytest.mark.parametrize("num_samples, world, batch", [(10, 3, 4), (5, 2, 8), (9, 4, 2)])
def test_evaluation_covers_every_sample_on_every_rank_count(num_samples, world, batch):
    order = epoch_order(num_samples, seed=0, epoch=0, shuffle=False)
    per_rank = [rank_batches(order, rank, world, batch, drop_last=False) for rank in range(world)]
    assert len({sum(len(b) for b in batches) for batches in per_rank}) == 1
    seen = {int(s) for batches in per_rank for b in batches for s in b}
    assert seen == set(range(num_samples))


def test_views_are_reproducible_and_stay_inside_the_video():
    views = [train_view(seed=0, epoch=0, sample=s, max_start=3) for s in range(200)]
    assert views == [train_view(seed=0, epoch=0, sample=s, max_start=3) for s in range(200)]
    assert {v.start for v in views} == {0, 1, 2, 3}
    assert all(0 <= v.crop_x <= 1 and 0 <= v.crop_y <= 1 for v in views)
    assert 60 < sum(v.flip for v in views) < 140
    assert train_view(0, 1, 5, 3) != train_view(0, 0, 5, 3)
    assert center_view(4) == center_view(4) and center_view(4).start == 2 and not center_view(4).flip

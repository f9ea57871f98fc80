import pickle
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from d3d_cluster.cli import main
from d3d_cluster.data.order import rank_steps
from d3d_cluster.train import evaluate
from d3d_cluster.train.evaluate import Predictions, ensemble, ensemble_report, gather_predictions, softmax

KEYS = ["c", "a", "b"]


def test_a_video_scores_the_mean_softmax_of_its_views_and_videos_come_out_sorted_by_key():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, 2.0]])
    samples, views = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 0, 1])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    predictions = gather_predictions(samples, views, logits, labels, KEYS, views_per_video=2)
    assert predictions.keys.tolist() == ["a", "b", "c"]
    expected_c = (softmax(logits[:2].numpy()).mean(axis=0))
    assert np.allclose(softmax(predictions.logits)[2], expected_c)
    assert predictions.labels.tolist() == [1, 1, 0]
    assert predictions.top1() == pytest.approx(2 / 3)
    assert predictions.views == 2


def test_missing_or_repeated_views_are_errors_but_skipped_corrupt_videos_are_left_out():
    logits = torch.zeros(4, 2)
    samples, labels = torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="missing views of 1 videos"):
        gather_predictions(samples, torch.tensor([0, 1, 0, 1]), logits, labels, KEYS, views_per_video=2)
    with pytest.raises(RuntimeError, match="read some views twice"):
        gather_predictions(samples, torch.tensor([0, 0, 0, 1]), logits, labels, KEYS, views_per_video=2)
    kept = gather_predictions(samples, torch.tensor([0, 1, 0, 1]), logits, labels, KEYS, views_per_video=2,
                              skipped=[2])
    assert kept.keys.tolist() == ["a", "c"] and kept.skipped.tolist() == [KEYS[2]]


def test_videos_that_could_not_be_decoded_are_counted_and_scored_as_wrong_in_the_second_top1(tmp_path):
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2]]  # three videos, each right
    predictions = Predictions(np.array(["a", "b", "c"]), logits, np.array([0, 1, 2]), views=1,
                              skipped=np.array(["d"]))
    report = predictions.report(["x", "y", "z"])
    assert (report["videos"], report["skipped_videos"], report["skipped"]) == (3, 1, ["d"])
    assert (report["top1"], report["top1_all_videos"]) == (1.0, 0.75)
    predictions.save(tmp_path)
    assert Predictions.load(tmp_path).skipped.tolist() == ["d"]


def test_top_k_counts_a_label_among_the_k_best_scores_capped_at_the_class_count():
    logits = np.array([[6, 5, 4, 3, 2, 1, 0],  # label ranked 1st
                       [0, 1, 2, 3, 4, 5, 6],  # label 0 ranked last
                       [1, 7, 1, 1, 1, 1, 0],  # label 2 tied 2nd: ties rank by class index, so within the top 5
                       [5, 4, 3, 2, 1, 6, 0]], dtype=np.float32)  # label 4 ranked 6th
    predictions = Predictions(np.array(["a", "b", "c", "d"]), logits, np.array([0, 0, 2, 4]), views=1)
    assert predictions.top1() == 0.25
    assert predictions.top_k(5) == 0.5
    assert predictions.top_k(6) == 0.75 and predictions.top_k(7) == 1.0
    three_classes = Predictions(np.array(["a", "b"]), logits[:2, :3], np.array([2, 0]), views=1)
    assert three_classes.top_k(5) == three_classes.top_k(3) == 1.0


def test_ties_in_top1_go_to_the_lower_class_index_as_argmax():
    predictions = Predictions(np.array(["a", "b"]), np.zeros((2, 3), np.float32), np.array([0, 1]), views=1)
    assert predictions.top1() == 0.5
    assert predictions.confusion()[:, 0].tolist() == [1, 1, 0]


def test_report_has_confusion_rows_true_columns_predicted_and_per_class_accuracy_by_name():
    # Predicted classes: 0, 0, 1, 2, 2; labels 0, 0, 0, 2, 1. Class "c" (2) right once, "b" (1) never, "a" 2 of 3.
    logits = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 2]]
    predictions = Predictions(np.array(list("vwxyz")), logits, np.array([0, 0, 0, 2, 1]), views=6)
    report = predictions.report(["a", "b", "c", "d"])
    assert report["confusion"] == [[2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert report["per_class"] == {"a": pytest.approx(2 / 3), "b": 0.0, "c": 1.0, "d": None}
    assert (report["top1"], report["top5"]) == (pytest.approx(3 / 5), 1.0)
    assert (report["videos"], report["views_per_video"], report["skipped_videos"]) == (5, 6, 0)
    assert report["top1_all_videos"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="predictions have 4 classes, the class list 3"):
        predictions.report(["a", "b", "c"])


def test_predictions_keep_their_views_through_the_file_and_an_older_file_is_refused_by_name(tmp_path):
    saved = Predictions(np.array(["a", "b"]), np.ones((2, 3), np.float32), np.array([0, 2]), views=6)
    saved.save(tmp_path)
    loaded = Predictions.load(tmp_path)
    assert loaded.views == 6 and loaded.keys.tolist() == ["a", "b"] and np.array_equal(loaded.logits, saved.logits)
    np.savez(tmp_path / "predictions.npz", keys=saved.keys, logits=saved.logits, labels=saved.labels)
    with pytest.raises(ValueError, match=f"{tmp_path / 'predictions.npz'}: no views array"):
        Predictions.load(tmp_path)


def test_an_ensemble_is_stored_as_predictions_of_the_mean_softmax_and_needs_the_same_views():
    keys, labels = np.array(["a", "b"]), np.array([0, 1])
    first = Predictions(keys, np.array([[2, 0], [0, 1]], np.float32), labels, views=3)
    second = Predictions(keys, np.array([[0, 1], [3, 0]], np.float32), labels, views=3)
    combined = ensemble({"first": first, "second": second})
    assert np.allclose(softmax(combined.logits), (softmax(first.logits) + softmax(second.logits)) / 2)
    assert combined.views == 3 and combined.report(["x", "y"])["confusion"] == [[1, 0], [1, 0]]
    other_views = Predictions(keys, second.logits, labels, views=1)
    with pytest.raises(ValueError, match="other and first were evaluated with 1 and 3 views per video"):
        ensemble({"first": first, "other": other_views})


ENSEMBLE_KEYS = np.array(["a", "b", "c", "d"])
LABELS = np.array([0, 1, 2, 0])


def _stage(directory, logits) -> str:
    directory.mkdir(parents=True)
    Predictions(ENSEMBLE_KEYS, np.array(logits, dtype=np.float32), LABELS, views=6).save(directory)
    return str(directory)


@pytest.fixture
def two_students(tmp_path):
    # Each student gets half the clips right, confidently; where it is wrong it is unsure, so the softmax
    # average follows whichever student is confident: the ensemble gets all four right.
    first = _stage(tmp_path / "seed0" / "student", [[5, 0, 0], [0, 5, 0], [0, 0.2, 0], [0, 0.1, 0]])
    second = _stage(tmp_path / "seed1" / "student", [[0, 0, 0.3], [0.2, 0, 0], [0, 0, 5], [5, 0, 0]])
    return first, second


def test_student_plus_student_ensemble_averages_softmax_scores(two_students):
    report = ensemble_report(two_students)
    assert report["members"] == {two_students[0]: 0.5, two_students[1]: 0.5}
    assert report["ensemble_top1"] == 1.0 and report["val_samples"] == 4


def test_members_evaluated_on_other_samples_are_refused(tmp_path, two_students):
    other = tmp_path / "other" / "student"
    other.mkdir(parents=True)
    Predictions(np.array(["a", "b", "c", "x"]), np.zeros((4, 3), np.float32), LABELS, views=6).save(other)
    with pytest.raises(ValueError, match=f"{other} and {two_students[0]} were evaluated on different samples"):
        ensemble_report([two_students[0], str(other)])


def test_ensemble_cli_prints_members_and_ensemble(two_students, tmp_path):
    result = CliRunner().invoke(main, ["ensemble", *two_students])
    assert result.exit_code == 0, result.output
    assert "50.0%" in result.output and "ensemble" in result.output and "100.0%" in result.output
    unfinished = tmp_path / "seed2" / "student"
    unfinished.mkdir(parents=True)
    result = CliRunner().invoke(main, ["ensemble", two_students[0], str(unfinished)])
    assert result.exit_code != 0 and "predictions.npz: no predictions" in result.output


class Rendezvous:
    """A barrier whose abort fails only the waits it interrupts: `threading.Barrier.abort` also fails a rank that
    the last arrival had already released but that had not yet woken, as a real collective never does."""

    def __init__(self, size: int):
        self.size, self.arrived, self.generation, self.broken = size, 0, 0, False
        self.condition = threading.Condition()

    def wait(self) -> None:
        with self.condition:
            if self.broken:
                raise threading.BrokenBarrierError
            generation = self.generation
            self.arrived += 1
            if self.arrived == self.size:
                self.arrived, self.generation = 0, generation + 1
                self.condition.notify_all()
                return
            self.condition.wait_for(lambda: self.generation != generation or self.broken)
            if self.generation == generation:
                raise threading.BrokenBarrierError

    def abort(self) -> None:
        with self.condition:
            self.broken = True
            self.condition.notify_all()


class ThreadWorld:
    """Ranks as threads in one process, with a stand-in for `gather_to_rank0` that hands rank 0 every rank's value
    through pickle, as torch's gather_object does, and records what each gather brought rank 0. A rank that raises
    breaks the barrier, so the others fail at their next gather instead of waiting for it."""

    def __init__(self, size: int):
        self.size, self.barrier, self.local = size, Rendezvous(size), threading.local()
        self.values, self.received = [None] * size, []

    def gather_to_rank0(self, value):
        rank = self.local.rank
        self.values[rank] = pickle.loads(pickle.dumps(value))
        self.barrier.wait()
        gathered = list(self.values) if rank == 0 else None
        if gathered is not None:
            self.received.append(gathered)
        self.barrier.wait()
        return gathered

    def run(self, work) -> list:
        """`work(rank)` on every rank at once; each rank's result, or the exception it raised."""
        results = [None] * self.size

        def rank_main(rank):
            self.local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as error:  # noqa: BLE001 - handed to the test as the rank's result
                results[rank] = error
                self.barrier.abort()

        threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results


VIEWS, CLASSES, VIDEOS = 6, 5, 11
SPLIT_KEYS = [f"video{(7 * s) % VIDEOS:02d}" for s in range(VIDEOS)]  # key order is not sample order


def fabricated_views(seed: int = 0):
    """Every view's logits (sample-major items, as evaluation's order has them) and each video's label."""
    rng = np.random.default_rng(seed)
    return rng.normal(scale=3.0, size=(VIDEOS * VIEWS, CLASSES)).astype(np.float32), rng.integers(0, CLASSES, VIDEOS)


def gather_every_view(logits: np.ndarray, labels: np.ndarray, skipped: set[int]) -> Predictions:
    """Today's scores as the gather of every view's logits on rank 0 computed them: each video's log mean softmax."""
    probabilities = softmax(logits).astype(np.float64).reshape(VIDEOS, VIEWS, CLASSES).sum(axis=1)
    kept = sorted(set(range(VIDEOS)) - skipped, key=lambda s: SPLIT_KEYS[s])
    return Predictions(np.array([SPLIT_KEYS[s] for s in kept]), np.log(probabilities[kept] / VIEWS).astype(np.float32),
                       labels[kept], VIEWS, np.array(sorted(SPLIT_KEYS[s] for s in skipped)))


def evaluate_in(world: ThreadWorld, monkeypatch, logits, labels, skipped_by: dict[int, int], batch_size: int = 2,
                dropped_view: int | None = None) -> list:
    """Every rank's gather_predictions over its share of the views as evaluation plans them (`rank_steps`); the
    rank `skipped_by[video]` finds that video corrupt and drops its own views of it, as the loader does."""
    monkeypatch.setattr(evaluate, "gather_to_rank0", world.gather_to_rank0)

    def work(rank):
        steps = rank_steps(np.arange(VIDEOS * VIEWS), 0, rank, world.size, batch_size)
        items = np.concatenate([items for items, _ in steps])
        skipped = [video for video, by in skipped_by.items() if by == rank]
        items = items[~np.isin(items // VIEWS, skipped) & (items != dropped_view)]
        return gather_predictions(torch.from_numpy(items // VIEWS), torch.from_numpy(items % VIEWS),
                                  torch.from_numpy(logits[items]), torch.from_numpy(labels[items // VIEWS]),
                                  SPLIT_KEYS, VIEWS, skipped)

    return world.run(work)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])  # 7 ranks: more than a video's views, one view a rank
def test_scores_from_summed_views_are_those_of_gathering_every_view_whatever_the_world_size(size, monkeypatch):
    logits, labels = fabricated_views(size)
    skipped_by = {4: size - 1, 9: 0}  # other ranks still decoded some views of these videos
    results = evaluate_in(ThreadWorld(size), monkeypatch, logits, labels, skipped_by)
    assert results[1:] == [None] * (size - 1)
    expected = gather_every_view(logits, labels, set(skipped_by))
    rank0 = results[0]
    assert rank0.keys.tolist() == expected.keys.tolist() and rank0.skipped.tolist() == expected.skipped.tolist()
    assert rank0.labels.tolist() == expected.labels.tolist() and rank0.views == VIEWS
    np.testing.assert_allclose(rank0.logits, expected.logits, rtol=1e-6, atol=1e-6)


def test_rank0_takes_at_most_scores_per_gather_scores_in_one_gather_and_one_row_per_video(monkeypatch):
    monkeypatch.setattr(evaluate, "SCORES_PER_GATHER", 2 * VIEWS * CLASSES)  # blocks of two videos
    world = ThreadWorld(4)
    logits, labels = fabricated_views()
    [predictions, *_] = evaluate_in(world, monkeypatch, logits, labels, {})
    scores_per_gather = [sum(array.size for part in parts for array in part
                             if isinstance(array, np.ndarray) and array.dtype.kind == "f") for parts in world.received]
    assert max(scores_per_gather) <= 2 * VIEWS * CLASSES and sum(scores_per_gather) > 0
    assert predictions.logits.shape == (VIDEOS, CLASSES)
    expected = gather_every_view(logits, labels, set())
    np.testing.assert_allclose(predictions.logits, expected.logits, rtol=1e-6, atol=1e-6)


def test_a_missing_view_fails_rank0_only_after_the_last_gather_so_no_rank_waits_in_one(monkeypatch):
    monkeypatch.setattr(evaluate, "SCORES_PER_GATHER", 2 * VIEWS * CLASSES)
    logits, labels = fabricated_views()
    results = evaluate_in(ThreadWorld(3), monkeypatch, logits, labels, {}, dropped_view=5 * VIEWS + 2)
    assert isinstance(results[0], RuntimeError) and "missing views of 1 videos" in str(results[0])
    assert str(SPLIT_KEYS[5]) in str(results[0]) and results[1:] == [None, None]

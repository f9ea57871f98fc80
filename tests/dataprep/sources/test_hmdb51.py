import json

import pytest

from dataprep.prepare import REJECTS_NAME, prepare_dataset
from dataprep.sources import SourceError, load_source

CLASSES = ["brush_hair", "cartwheel", "catch"]


def _video(label, number):
    return f"April_09_{label}_u_nm_np1_ba_goo_{number}.avi"


def make_hmdb51(root, write_video=None):
    """hmdb51_org/<class>/ with 4 videos each and testTrainMulti_7030_splits/: in split N video N tests,
    video 0 is unused, the others train (trailing spaces, as shipped)."""
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for number, label in enumerate(CLASSES):
        for split in (1, 2, 3):
            ids = {0: 0, split: 2}
            lines = [f"{_video(label, v)} {ids.get(v, 1)} \n" for v in range(4)]
            (splits / f"{label}_test_split{split}.txt").write_text("".join(lines))
        for v in range(4):
            path = root / "hmdb51_org" / label / _video(label, v)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, seed=10 * number + v) if write_video else path.touch()
    return root


@pytest.fixture
def hmdb_prep(small_prep):
    def make(**fields):
        return small_prep(**{"source": "hmdb51", "root": "hmdb51_org", "annotations": "testTrainMulti_7030_splits",
                             **fields})
    return make


def test_split_ids_pick_train_val_and_unused_and_classes_come_from_the_split_files(tmp_path, hmdb_prep):
    make_hmdb51(tmp_path)
    for split in (1, 2, 3):
        dataset = load_source(hmdb_prep(split_number=split), tmp_path)
        assert dataset.classes == CLASSES and dataset.rejects == []
        assert sorted(r.path.name for r in dataset.records if r.split == "val") == sorted(_video(c, split) for c in CLASSES)
        assert sum(r.split == "train" for r in dataset.records) == 6
        assert not any(r.path.name.endswith("_0.avi") for r in dataset.records)


def test_a_video_in_another_class_folder_is_a_label_mismatch_and_an_absent_one_missing(tmp_path, hmdb_prep):
    make_hmdb51(tmp_path)
    moved = tmp_path / "hmdb51_org/catch" / _video("cartwheel", 3)
    (tmp_path / "hmdb51_org/cartwheel" / _video("cartwheel", 3)).rename(moved)
    (tmp_path / "hmdb51_org/brush_hair" / _video("brush_hair", 1)).unlink()
    dataset = load_source(hmdb_prep(), tmp_path)
    assert [(r.reason, r.record.label, r.record.split) for r in dataset.rejects] == [
        ("missing", "brush_hair", "val"), ("label mismatch", "cartwheel", "train")]
    assert "brush_hair_test_split1.txt:2: " in dataset.rejects[0].detail
    assert "cartwheel_test_split1.txt:4: listed as 'cartwheel' but lies in catch" in dataset.rejects[1].detail


def test_malformed_or_missing_split_files_are_errors_naming_them(tmp_path, hmdb_prep):
    make_hmdb51(tmp_path)
    with pytest.raises(SourceError, match="nowhere: HMDB-51 split folder not found"):
        load_source(hmdb_prep(annotations="nowhere"), tmp_path)
    (tmp_path / "testTrainMulti_7030_splits/catch_test_split2.txt").write_text("a.avi 1\nb.avi 3\n")
    with pytest.raises(SourceError, match=r"catch_test_split2.txt:2: expected '<video> <0\|1\|2>', got 'b.avi 3'"):
        load_source(hmdb_prep(split_number=2), tmp_path)
    for path in (tmp_path / "testTrainMulti_7030_splits").glob("*_split3.txt"):
        path.unlink()
    with pytest.raises(SourceError, match="no HMDB-51 split files named <class>_test_split3.txt"):
        load_source(hmdb_prep(split_number=3), tmp_path)


def test_prepared_hmdb51_of_mixed_sizes_fits_every_video_to_the_frame_size(tmp_path, hmdb_prep, tiny_video):
    make_hmdb51(tmp_path, tiny_video)
    for number, label in enumerate(CLASSES):  # HMDB-51 keeps each clip's aspect ratio: widths differ
        tiny_video(tmp_path / "hmdb51_org" / label / _video(label, 2), size=(24, 40 + 8 * number), seed=number)
    (tmp_path / "hmdb51_org/catch" / _video("catch", 3)).write_text("not a video\n")
    prep = hmdb_prep(frame_size=[32, 32])
    manifest = prepare_dataset(prep, load_source(prep, tmp_path), tmp_path / "shards", progress=False)
    assert (manifest.height, manifest.width) == (32, 32)
    assert manifest.splits["train"].class_counts == {"brush_hair": 2, "cartwheel": 2, "catch": 1}
    assert manifest.splits["val"].class_counts == dict.fromkeys(CLASSES, 1)
    (bad,) = [json.loads(line) for line in (tmp_path / "shards" / REJECTS_NAME).read_text().splitlines()]
    assert (bad["path"], bad["reason"]) == (f"catch/{_video('catch', 3)}", "unreadable")

    short_side = hmdb_prep()  # without frame_size the first video fixes the size: the others are rejected
    prepare_dataset(short_side, load_source(short_side, tmp_path), tmp_path / "by_short_side", progress=False)
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "by_short_side" / REJECTS_NAME).read_text().splitlines()]
    assert reasons.count("size mismatch") == 3

import json

import pytest

from dataprep.prepare import REJECTS_NAME, prepare_dataset
from dataprep.sources import SourceError, load_source

CLASSES = ["ApplyEyeMakeup", "Archery", "HandstandPushups"]
STEM = {"ApplyEyeMakeup": "ApplyEyeMakeup", "Archery": "Archery", "HandstandPushups": "HandStandPushups"}  # as in the archive


def _name(label, group, clip=1):
    return f"{label}/v_{STEM[label]}_g{group:02d}_c{clip:02d}.avi"


def make_ucf101(root, write_video=None):
    """UCF-101/ with 3 groups per class (empty files unless write_video is given) and ucfTrainTestlist/,
    whose split N tests on group N (CRLF lines, as shipped)."""
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {label}\r\n" for i, label in enumerate(CLASSES, start=1)))
    for split in (1, 2, 3):
        train = [f"{_name(label, group)} {i}" for i, label in enumerate(CLASSES, 1) for group in (1, 2, 3) if group != split]
        test = [_name(label, split) for label in CLASSES]
        (lists / f"trainlist0{split}.txt").write_text("\r\n".join(train) + "\r\n")
        (lists / f"testlist0{split}.txt").write_text("\r\n".join(test) + "\r\n")
    for number, label in enumerate(CLASSES):
        for group in (1, 2, 3):
            path = root / "UCF-101" / _name(label, group)
            if write_video:
                write_video(path, seed=10 * number + group)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    return root


@pytest.fixture
def ucf_prep(small_prep):
    def make(**fields):
        return small_prep(**{"source": "ucf101", "root": "UCF-101", "annotations": "ucfTrainTestlist", **fields})
    return make


def test_split_files_pick_train_and_val_and_classes_follow_class_ind(tmp_path, ucf_prep):
    make_ucf101(tmp_path)
    for split in (1, 2, 3):
        dataset = load_source(ucf_prep(split_number=split), tmp_path)
        assert dataset.classes == CLASSES and dataset.rejects == []
        val = sorted(r.path.relative_to(tmp_path / "UCF-101").as_posix() for r in dataset.records if r.split == "val")
        assert val == sorted(_name(label, split) for label in CLASSES)
        assert sum(r.split == "train" for r in dataset.records) == 6
        assert all(r.path.parent.name == r.label for r in dataset.records)


def test_a_wrong_class_index_and_a_missing_file_are_rejected_with_their_line(tmp_path, ucf_prep):
    make_ucf101(tmp_path)
    lists = tmp_path / "ucfTrainTestlist"
    with open(lists / "trainlist01.txt", "a") as handle:
        handle.write(f"{_name('Archery', 2, clip=2)} 1\r\n")  # exists under Archery, listed as class 1
    (tmp_path / "UCF-101" / _name("Archery", 2, clip=2)).touch()
    (tmp_path / "UCF-101" / _name("HandstandPushups", 1)).unlink()  # listed in testlist01, line 3
    dataset = load_source(ucf_prep(), tmp_path)
    assert [(r.reason, r.record.label) for r in dataset.rejects] == [("label mismatch", "ApplyEyeMakeup"),
                                                                    ("missing", "HandstandPushups")]
    assert "trainlist01.txt:7: listed as 'ApplyEyeMakeup' but lies in folder 'Archery'" in dataset.rejects[0].detail
    assert "testlist01.txt:3:" in dataset.rejects[1].detail
    assert len(dataset.records) == 8


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("classInd.txt", "1 ApplyEyeMakeup\n3 Archery\n", "classInd.txt:2: index 3 out of order, expected 2"),
        ("trainlist01.txt", "Archery/v_Archery_g02_c01.avi 4\n", "trainlist01.txt:1: class index '4' is not in 1..3"),
        ("testlist01.txt", "v_Archery_g01_c01.avi\n", r"testlist01.txt:1: expected '<class>/<file> \[<index>\]'"),
    ],
)
def test_a_malformed_list_is_an_error_naming_file_and_line(tmp_path, ucf_prep, file, text, message):
    make_ucf101(tmp_path)
    (tmp_path / "ucfTrainTestlist" / file).write_text(text)
    with pytest.raises(SourceError, match=message):
        load_source(ucf_prep(), tmp_path)


def test_missing_lists_or_video_folder_are_errors_naming_them(tmp_path, ucf_prep):
    make_ucf101(tmp_path)
    (tmp_path / "ucfTrainTestlist/testlist02.txt").unlink()
    with pytest.raises(SourceError, match="testlist02.txt: UCF-101 split list not found"):
        load_source(ucf_prep(split_number=2), tmp_path)
    with pytest.raises(SourceError, match="elsewhere: video folder not found"):
        load_source(ucf_prep(root="elsewhere"), tmp_path)


def test_prepared_ucf101_manifest_has_its_classes_splits_and_rejects(tmp_path, ucf_prep, tiny_video):
    make_ucf101(tmp_path, tiny_video)
    (tmp_path / "UCF-101" / _name("Archery", 3)).write_bytes(b"")  # a zero-byte download, in train
    manifest = prepare_dataset(ucf_prep(), load_source(ucf_prep(), tmp_path), tmp_path / "shards", progress=False)
    assert manifest.classes == CLASSES
    assert manifest.splits["train"].class_counts == {"ApplyEyeMakeup": 2, "Archery": 1, "HandstandPushups": 2}
    assert manifest.splits["val"].class_counts == dict.fromkeys(CLASSES, 1)
    rejects = [json.loads(line) for line in (tmp_path / "shards" / REJECTS_NAME).read_text().splitlines()]
    assert rejects == [{"path": _name("Archery", 3), "label": "Archery", "split": "train", "reason": "empty",
                        "detail": f"{tmp_path / 'UCF-101' / _name('Archery', 3)}: zero bytes"}]
    assert manifest.rejects == 1 and (manifest.height, manifest.width) == (32, 32)

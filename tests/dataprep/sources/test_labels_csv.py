import pytest

from dataprep.sources import SourceError, VideoRecord, load_source
from dataprep.sources.labels_csv import read_labels_csv


def test_paths_resolve_against_the_csv_split_defaults_to_train_and_classes_are_sorted(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nb/one.mp4,walk\n\ntwo.mp4,run\n")
    dataset = read_labels_csv(labels)
    assert dataset.records == [
        VideoRecord(tmp_path / "b/one.mp4", "walk", "train"),
        VideoRecord(tmp_path / "two.mp4", "run", "train"),
    ]
    assert dataset.classes == ["run", "walk"] and dataset.root == tmp_path and dataset.rejects == []


def test_classes_come_from_the_training_videos_and_other_labels_are_rejected(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\na.mp4,walk,train\nb.mp4,swim,val\n")
    dataset = read_labels_csv(labels)
    assert dataset.classes == ["walk"] and [r.label for r in dataset.records] == ["walk"]
    (rejected,) = dataset.rejects
    assert rejected.record.path == tmp_path / "b.mp4" and rejected.reason == "label unknown"


def test_the_csv_source_reads_prep_labels_relative_to_the_workdir(tmp_path, small_prep):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/mine.csv").write_text("path,label\nclip.mp4,walk\n")
    dataset = load_source(small_prep(source="csv", labels="lists/mine.csv"), tmp_path)
    assert dataset.records == [VideoRecord(tmp_path / "lists/clip.mp4", "walk", "train")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,label\na.mp4,walk\nb.mp4\n", ":3: expected 2 fields"),
        ("path,label,split\na.mp4,walk,test\n", ":2: split must be one of train, val"),
        ("path,label\n,walk\n", ":2: empty path or label"),
        ("file,class\na.mp4,walk\n", ":1: header must be path,label"),
    ],
)
def test_a_malformed_row_is_an_error_naming_the_file_and_line(tmp_path, text, message):
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    with pytest.raises(SourceError, match=f"labels.csv{message}"):
        read_labels_csv(labels)


def test_a_missing_csv_is_an_error_naming_it(tmp_path, small_prep):
    with pytest.raises(SourceError, match=f"{tmp_path}/raw/labels.csv: cannot read labels CSV"):
        load_source(small_prep(source="csv"), tmp_path)

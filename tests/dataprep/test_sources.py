import pytest

from dataprep.sources import VideoRecord, read_labels_csv


def test_paths_resolve_against_the_csv_split_defaults_to_train_and_classes_are_sorted(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nb/one.mp4,walk\n\ntwo.mp4,run\n")
    records, classes = read_labels_csv(labels)
    assert records == [
        VideoRecord(tmp_path / "b/one.mp4", "walk", "train"),
        VideoRecord(tmp_path / "two.mp4", "run", "train"),
    ]
    assert classes == ["run", "walk"]


def test_classes_come_from_the_training_videos(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\na.mp4,walk,train\nb.mp4,swim,val\n")
    assert read_labels_csv(labels)[1] == ["walk"]


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
    with pytest.raises(ValueError, match=f"labels.csv{message}"):
        read_labels_csv(labels)

import json

import pytest

from dataprep.prepare import REJECTS_NAME, prepare_dataset
from dataprep.sources import SourceError, load_source
from dataprep.sources.kinetics import clip_name

CLASSES = ["abseiling", "air drumming", "passing American football (in game)"]
HEADER = "label,youtube_id,time_start,time_end,split,is_cc\n"  # Kinetics-400's columns


def _rows(split, count):
    """(label, youtube id, start, end) of `count` clips per class; ids are 11 characters like YouTube's."""
    return [(label, f"{split[:2]}{c}{n}-x_{'y' * 5}", 7 * n, 7 * n + 10)
            for c, label in enumerate(CLASSES) for n in range(count)]


def make_kinetics(root, layout, write_video=None, val_file="validate.csv"):
    """annotations/ with train, val and test CSVs; clips per split (root/<split>/) or per class (root/<split>/<label>/)."""
    annotations = root / "annotations"
    annotations.mkdir(parents=True)
    rows = {"train": _rows("train", 3), "val": _rows("val", 1)}
    for split, name in (("train", "train.csv"), ("val", val_file)):
        lines = [f'"{label}",{yid},{start},{end},{split},0\n' for label, yid, start, end in rows[split]]
        (annotations / name).write_text(HEADER + "".join(lines))
    (annotations / "test.csv").write_text(HEADER + "abseiling,testtesttes,0,10,test,0\n")
    for split, split_rows in rows.items():
        for number, (label, yid, start, end) in enumerate(split_rows):
            folder = root / "clips" / split / (label if layout == "per class" else "")
            path = folder / f"{clip_name(yid, start, end)}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, seed=number, size=(24 + 8 * (number % 2), 40)) if write_video else path.touch()
    return rows


@pytest.fixture
def kinetics_prep(small_prep):
    def make(**fields):
        return small_prep(**{"source": "kinetics", "root": "clips", "annotations": "annotations", **fields})
    return make


@pytest.mark.parametrize("layout, val_file", [("per split", "validate.csv"), ("per class", "val.csv")])
def test_clips_are_found_in_either_layout_by_youtube_id_and_time_span(tmp_path, kinetics_prep, layout, val_file):
    rows = make_kinetics(tmp_path, layout, val_file=val_file)
    dataset = load_source(kinetics_prep(), tmp_path)
    assert dataset.classes == sorted(CLASSES) and dataset.rejects == []
    found = {(r.split, r.label, r.path.name) for r in dataset.records}
    assert found == {(split, label, f"{clip_name(yid, start, end)}.mp4")
                     for split, split_rows in rows.items() for label, yid, start, end in split_rows}
    assert all(r.path.is_file() for r in dataset.records)


def test_clips_missing_or_in_another_class_folder_are_rejected_not_fatal(tmp_path, kinetics_prep):
    rows = make_kinetics(tmp_path, "per class")
    label, yid, start, end = rows["train"][0]
    (tmp_path / "clips/train" / label / f"{clip_name(yid, start, end)}.mp4").unlink()
    label, yid, start, end = rows["val"][1]
    (tmp_path / "clips/val" / label / f"{clip_name(yid, start, end)}.mp4").rename(
        tmp_path / "clips/val/abseiling" / f"{clip_name(yid, start, end)}.mp4")
    dataset = load_source(kinetics_prep(), tmp_path)
    assert [(r.reason, r.record.split) for r in dataset.rejects] == [("missing", "train"), ("label mismatch", "val")]
    assert dataset.rejects[0].detail.startswith(f"no clip named {clip_name(*rows['train'][0][1:])} under ")
    assert len(dataset.records) == len(rows["train"]) + len(rows["val"]) - 2


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("train.csv", "label,youtube_id,time_start,split\n", "train.csv:1: missing column.s. time_end"),
        ("train.csv", HEADER + "abseiling,abcdefghijk,x,10,train,0\n", "train.csv:2: time_start and time_end must be seconds"),
        ("validate.csv", HEADER + "abseiling,abcdefghijk,0,10,holdout,0\n", "validate.csv:2: split must be one of"),
        ("validate.csv", HEADER + ",abcdefghijk,0,10,val,0\n", "validate.csv:2: empty label or youtube_id"),
    ],
)
def test_malformed_annotations_are_errors_naming_file_and_line(tmp_path, kinetics_prep, file, text, message):
    make_kinetics(tmp_path, "per split")
    (tmp_path / "annotations" / file).write_text(text)
    with pytest.raises(SourceError, match=message):
        load_source(kinetics_prep(), tmp_path)


def test_missing_annotation_files_or_clip_folder_are_errors_naming_them(tmp_path, kinetics_prep):
    make_kinetics(tmp_path, "per split")
    with pytest.raises(SourceError, match="nowhere: clip folder not found"):
        load_source(kinetics_prep(root="nowhere"), tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SourceError, match="prep.source kinetics: no usable video listed .12 rejected, first: no clip named"):
        load_source(kinetics_prep(root="elsewhere"), tmp_path)  # a wrong root is an error, not 12 rejects
    (tmp_path / "annotations/validate.csv").unlink()
    with pytest.raises(SourceError, match="no Kinetics validation annotations .validate.csv or val.csv."):
        load_source(kinetics_prep(), tmp_path)


def test_prepared_kinetics_of_mixed_aspect_ratios_and_a_one_frame_clip(tmp_path, kinetics_prep, tiny_video):
    rows = make_kinetics(tmp_path, "per split", tiny_video)
    label, yid, start, end = rows["train"][4]
    tiny_video(tmp_path / "clips/train" / f"{clip_name(yid, start, end)}.mp4", frames=1)
    prep = kinetics_prep(frame_size=[32, 48])
    manifest = prepare_dataset(prep, load_source(prep, tmp_path), tmp_path / "shards", progress=False, min_frames=5)
    assert manifest.classes == sorted(CLASSES) and (manifest.height, manifest.width) == (32, 48)
    assert manifest.splits["train"].class_counts == {"abseiling": 3, "air drumming": 2,
                                                     "passing American football (in game)": 3}
    assert manifest.splits["val"].samples == 3
    (short,) = [json.loads(line) for line in (tmp_path / "shards" / REJECTS_NAME).read_text().splitlines()]
    assert short["reason"] == "too short" and short["detail"] == "1 frames at 25 fps, need at least 5"
    assert short["path"] == f"train/{clip_name(yid, start, end)}.mp4" and short["label"] == label

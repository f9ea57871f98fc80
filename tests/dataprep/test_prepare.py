import json
import shutil
import zlib

import numpy as np
import pytest
import webdataset

from d3d_cluster.data.schema import SAMPLE_EXTS, Manifest, frame_to_flow, quantize_flow, sha256_of
from d3d_cluster.spec import PrepSpec, SyntheticSpec
from dataprep.flow import compute_flow
from dataprep.prepare import SUMMARY_NAME, MissingShards, finalize, plan_shards, prepare_dataset, run_array_task
from dataprep.sources.labels_csv import read_labels_csv
from dataprep.synthetic import make_motion_dataset, render_video
from dataprep.video import dali_decode, read_video, write_h264

PREP = PrepSpec(
    synthetic=SyntheticSpec(classes=3, videos_per_class=4, frames=8, size=32, val_fraction=0.25),
    short_side=32,
    flow={"algorithm": "farneback"},
    flow_crf=0,  # the default, near-lossless: stored flow is within +-1 of recomputed flow (crf 10: rare 3-17 level outliers)
    shard_samples=3,
    workers=2,
)
BAD = {  # path: label, split, reason, detail
    "bad/empty.mp4": ("up", "train", "empty", "bad/empty.mp4: zero bytes"),
    "bad/text.mp4": ("up", "train", "unreadable", "bad/text.mp4: unreadable video"),
    "bad/truncated.mp4": ("up", "train", "unreadable", "bad/truncated.mp4: unreadable video"),
    "bad/one_frame.mp4": ("up", "train", "too short", "1 frames at 25 fps, need at least 2"),
    "bad/gone.mp4": ("down", "val", "missing", "bad/gone.mp4: no such file"),
    "bad/whole.mp4": ("spin", "val", "label unknown", "'spin' is not one of the 3 classes"),
}


def _add_bad_videos(raw):
    (raw / "bad").mkdir()
    (raw / "bad/empty.mp4").write_bytes(b"")
    (raw / "bad/text.mp4").write_text("this is not a video\n")
    video = render_video(np.random.default_rng(9), "up", 8, 32)
    write_h264(raw / "bad/one_frame.mp4", video[:1], 25)
    write_h264(raw / "bad/whole.mp4", video, 25)
    whole = (raw / "bad/whole.mp4").read_bytes()
    (raw / "bad/truncated.mp4").write_bytes(whole[: len(whole) // 2])
    with open(raw / "labels.csv", "a") as labels:
        labels.writelines(f"{path},{label},{split}\n" for path, (label, split, _, _) in BAD.items())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    labels = make_motion_dataset(PREP.synthetic, root / "raw", seed=0)
    _add_bad_videos(root / "raw")
    manifest = prepare_dataset(PREP, read_labels_csv(labels), root / "shards", progress=False)
    return labels, root / "shards", manifest


def _samples(shards, manifest, split):
    tars = [str(shards / shard.path) for shard in manifest.splits[split].shards]
    return list(webdataset.WebDataset(tars, shardshuffle=False, empty_check=False))


def test_good_videos_are_written_readable_with_webdataset_and_decodable_by_dali(prepared):
    labels, shards, manifest = prepared
    dataset = read_labels_csv(labels)
    classes = dataset.classes
    expected = {f"{r.split}_{i:06d}": r for i, r in enumerate(dataset.records) if "bad/" not in str(r.path)}
    samples = [s for split in ("train", "val") for s in _samples(shards, manifest, split)]
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    for sample in samples:
        record = expected[sample["__key__"]]
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == classes.index(record.label) and meta["label"] == record.label
        assert meta == {"key": sample["__key__"], "label": record.label, "source": meta["source"], "frames": 8}
        assert labels.parent / meta["source"] == record.path
        assert dali_decode(sample["rgb.webm"]).shape == (8, 32, 32, 3)
        flow = dali_decode(sample["flow.webm"])
        assert flow.shape == (7, 32, 64, 3)
        computed = quantize_flow(compute_flow(read_video(record.path)[0], PREP.flow), PREP.flow.bound)
        assert np.abs(frame_to_flow(flow).astype(int) - computed).max() <= 2


def test_manifest_counts_classes_and_checksums_match_the_shards(prepared):
    labels, shards, manifest = prepared
    assert Manifest.load(shards) == manifest
    assert manifest.classes == ["down", "sideways", "up"]
    assert (manifest.min_frames, manifest.height, manifest.width, manifest.keyframe_interval) == (8, 32, 32, 8)
    assert manifest.flow["algorithm"] == "farneback" and manifest.flow["bound"] == 20.0
    assert manifest.splits["train"].class_counts == {"down": 3, "sideways": 3, "up": 3}
    assert manifest.splits["val"].class_counts == {"down": 1, "sideways": 1, "up": 1}
    for split, info in manifest.splits.items():
        tars, indexes = manifest.shard_paths(shards, split)
        assert all(index.is_file() for index in indexes)
        assert [shard.sha256 for shard in info.shards] == [sha256_of(tar) for tar in tars]
        per_tar = [len(list(webdataset.WebDataset(str(tar), shardshuffle=False, empty_check=False))) for tar in tars]
        assert [shard.samples for shard in info.shards] == per_tar and info.samples == sum(per_tar)


def test_samples_are_shuffled_across_shards(prepared):
    _, shards, manifest = prepared
    keys = [s["__key__"] for s in _samples(shards, manifest, "train")]
    assert len(manifest.splits["train"].shards) > 2
    assert keys != sorted(keys)


def test_bad_videos_are_listed_in_rejects_with_reasons_and_nothing_else_is_lost(prepared):
    _, shards, manifest = prepared
    rejects = [json.loads(line) for line in (shards / "rejects.jsonl").read_text().splitlines()]
    assert manifest.rejects == len(rejects) == len(BAD)
    for reject in rejects:
        label, split, reason, detail = BAD[reject["path"]]
        assert (reject["label"], reject["split"], reject["reason"]) == (label, split, reason)
        assert detail in reject["detail"]
    assert manifest.splits["train"].samples + manifest.splits["val"].samples == 12
    summary = json.loads((shards / SUMMARY_NAME).read_text())
    assert summary["videos_written"] == {"train": 9, "val": 3} and summary["videos"] == 12 + len(BAD) - 1
    assert summary["rejects"] == {"unreadable": 2, "empty": 1, "too short": 1, "missing": 1, "label unknown": 1}


def test_two_array_tasks_and_finalize_give_the_single_run_manifest_and_shards(prepared, tmp_path, capsys):
    labels, shards, manifest = prepared
    dataset = read_labels_csv(labels)
    names = [job.name for job in plan_shards(PREP, dataset, tmp_path)]
    assert run_array_task(PREP, dataset, tmp_path, task=0, tasks=2) == names[0::2]
    with pytest.raises(MissingShards, match=f"{len(names[1::2])} of {len(names)} shards are not finished: "
                                            f"{', '.join(names[1::2])}"):
        finalize(PREP, dataset, tmp_path)
    assert not (tmp_path / "manifest.json").exists()
    assert run_array_task(PREP, dataset, tmp_path, task=1, tasks=2) == names[1::2]
    assert run_array_task(PREP, dataset, tmp_path, task=1, tasks=2) == []  # a rerun finds its shards finished
    assert finalize(PREP, dataset, tmp_path, progress=False) == manifest  # checksums included: same bytes
    assert (tmp_path / "rejects.jsonl").read_text() == (shards / "rejects.jsonl").read_text()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"[prep task 1/2] {len(names[0::2])} shards, 0 already finished, {len(names[0::2])} to write"
    assert lines[1].startswith(f"[prep task 1/2] {names[0]}: ") and lines[1].endswith(f"(1/{len(names[0::2])})")
    assert f"[prep task 2/2] {len(names[1::2])} shards, {len(names[1::2])} already finished, 0 to write" in lines


def test_rerun_skips_finished_shards_and_redoes_a_missing_one(prepared, tmp_path):
    labels, shards, manifest = prepared
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard_files = sorted(copy.glob("*-0*.*"))  # tar, idx and sidecar json of every shard
    stamps = {path.name: path.stat().st_mtime_ns for path in shard_files}
    (copy / "train-000001.tar").unlink()
    again = prepare_dataset(PREP, read_labels_csv(labels), copy, progress=False)
    changed = {path.name for path in shard_files if path.stat().st_mtime_ns != stamps[path.name]}
    assert changed == {"train-000001.tar", "train-000001.idx", "train-000001.json"}
    assert again.splits["train"].samples == manifest.splits["train"].samples and again.rejects == manifest.rejects
    assert [s.path for s in again.splits["train"].shards] == [s.path for s in manifest.splits["train"].shards]


def test_videos_shorter_than_min_frames_are_rejected(prepared, tmp_path):
    labels, _, _ = prepared
    with pytest.raises(RuntimeError, match="no video could be prepared"):
        prepare_dataset(PREP, read_labels_csv(labels), tmp_path, workers=1, progress=False, min_frames=9)
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert sum(r["detail"] == "8 frames at 25 fps, need at least 9" for r in rejects) == 12
    assert all(r["reason"] == "too short" for r in rejects if r["detail"].startswith("8 frames"))


def test_with_loop_short_videos_shorter_than_a_clip_are_looped_with_their_flow(prepared, tmp_path):
    labels, _, _ = prepared
    looping = PREP.model_copy(update={"loop_short": True})
    manifest = prepare_dataset(looping, read_labels_csv(labels), tmp_path, workers=1, progress=False, min_frames=20)
    assert manifest.min_frames == 20 and manifest.splits["train"].samples + manifest.splits["val"].samples == 12
    sample = _samples(tmp_path, manifest, "train")[0]
    rgb, flow = dali_decode(sample["rgb.webm"]), frame_to_flow(dali_decode(sample["flow.webm"]))
    assert rgb.shape[0] == 20 and flow.shape[0] == 19
    assert np.abs(rgb[8:16].astype(int) - rgb[:8]).mean() < 2  # the same 8 frames again, up to VP9 noise
    assert np.abs(flow[8:16].astype(int) - flow[:8]).max() <= 2  # flow 7 is the seam from frame 7 back to frame 0


def test_changed_settings_redo_every_shard(prepared, tmp_path):
    labels, shards, _ = prepared
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    before = {path.name: sha256_of(path) for path in copy.glob("*.tar")}
    prepare_dataset(PREP.model_copy(update={"crf": 30}), read_labels_csv(labels), copy, progress=False)
    assert all(sha256_of(copy / name) != digest for name, digest in before.items())


def test_manifest_records_each_samples_label_and_member_checksums_in_shard_order(prepared):
    _, shards, manifest = prepared
    for split, info in manifest.splits.items():
        for shard in info.shards:
            samples = list(webdataset.WebDataset(str(shards / shard.path), shardshuffle=False, empty_check=False))
            assert shard.labels == [int(sample["cls"]) for sample in samples]
            assert shard.checksums == {ext: [zlib.crc32(sample[ext]) for sample in samples] for ext in SAMPLE_EXTS}

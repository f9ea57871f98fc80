"""What a `d3dc predict` run reads and writes: the videos it is given (files, folders, globs, CSV listings) and its
results file, CSV or JSON lines, a row flushed as each video finishes, so that a run stopped halfway keeps what it
finished and `--resume` goes on from there."""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path
from typing import Sequence

from d3d_cluster.predict import ExportedModel, Scored

# What a folder's videos are taken to be (any container PyAV reads may also be named one by one).
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


def list_videos(inputs: Sequence[str]) -> list[str]:
    """The videos named by `inputs`, in order, each once: a folder gives the videos below it (sorted), a `.csv` file
    the `path` column of its rows (relative to the CSV's folder), a pattern with `*`, `?` or `[` the files it
    matches (sorted; `**` recurses), anything else itself (a missing file is reported when it is scored)."""
    videos: list[str] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"{given}: no videos in this folder (looked for {', '.join(VIDEO_SUFFIXES)})")
        elif path.suffix.lower() == ".csv" and path.is_file():
            found = _listed(path)
        elif not path.exists() and glob.has_magic(given):
            found = sorted(p for p in glob.glob(given, recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"{given}: the pattern matches no file")
        else:
            found = [given]
        videos.extend(found)
    return list(dict.fromkeys(videos))


def _listed(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: a CSV of videos needs a `path` column (its header: "
                             f"{','.join(reader.fieldnames or [])})")
        listed = [str(path.parent / row["path"].strip()) for row in reader if (row["path"] or "").strip()]
    if not listed:
        raise ValueError(f"{path}: no videos listed")
    return listed


def result_row(model: ExportedModel, scored: Scored, top_k: int) -> dict:
    """A video's row: its path, the clips scored, the top classes and probabilities, or the error."""
    top = [] if scored.probabilities is None else model.top(scored.probabilities, top_k)
    return {"path": scored.video, "clips": scored.clips, "top": top, "error": scored.error}


class ResultsFile:
    """A predict run's rows, appended and flushed one at a time. The format is the file's suffix: `.csv` (a column
    pair class_i, probability_i per rank) or `.jsonl` (a row's JSON a line). Opened with `resume`, an existing file
    is continued: a last line cut short by the interruption is dropped and `done` holds the paths it has rows for;
    without it, an existing file is refused rather than overwritten."""

    def __init__(self, path: str | Path, top_k: int, resume: bool = False):
        self.path, self.top_k = Path(path), top_k
        self.format = FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise ValueError(f"{self.path}: results go to a .csv or .jsonl file")
        ranked = (f"{name}_{rank}" for rank in range(1, top_k + 1) for name in ("class", "probability"))
        self.columns = ["path", *ranked, "clips", "error"]
        self.done: set[str] = set()
        if self.path.exists() and not resume:
            raise FileExistsError(f"{self.path} exists: pass --resume to continue it (its videos are skipped), or "
                                  f"remove it")
        if self.path.exists():
            self.done = self._finished()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", newline="")
        if fresh and self.format == "csv":
            self._write_line(self.columns)

    def _finished(self) -> set[str]:
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # the row being written when the run stopped
            self.path.write_text(text)
        if self.format == "jsonl":
            try:
                return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path}: not the JSON lines of a predict run ({error})") from None
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is not None and header != self.columns:
            raise ValueError(f"{self.path}: its columns are {','.join(header)}, this run's {','.join(self.columns)} "
                             f"(resume with the --top it was written with)")
        return {row[0] for row in reader if row}

    def _write_line(self, fields: list) -> None:
        csv.writer(self._handle, lineterminator="\n").writerow(fields)
        self._handle.flush()

    def write(self, row: dict) -> None:
        if self.format == "jsonl":
            self._handle.write(json.dumps(row) + "\n")
            self._handle.flush()
        else:
            ranked = [value for entry in row["top"] for value in (entry["class"], f"{entry['probability']:.6g}")]
            ranked += [""] * (2 * self.top_k - len(ranked))
            self._write_line([row["path"], *ranked, row["clips"], row["error"] or ""])
        self.done.add(row["path"])

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

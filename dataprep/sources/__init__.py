"""Sources: one module per dataset layout, each turning what lies on disk into a `Dataset`.

    dataset = load_source(spec.prep, Path(spec.workdir))

reads the listings only (split files, annotation CSVs, folder names; never a video), so it is quick, can
run on a login node, and raises `SourceError` naming the file and line of anything missing or malformed
before any work starts. Problems with single videos are not errors: they become `Rejected` entries
(the source's own) or rejects of `prepare` (what decoding finds), all listed in rejects.jsonl.
The output is a pure function of the files, so every array task can load it again and agree.
"""

from __future__ import annotations

from pathlib import Path

from d3d_cluster.spec import PrepSpec
from dataprep.sources import hmdb51, kinetics, labels_csv, synthetic, ucf101
from dataprep.sources.records import Dataset, Rejected, SourceError, VideoRecord

READERS = {
    "synthetic": synthetic.read,
    "csv": labels_csv.read,
    "ucf101": ucf101.read,
    "hmdb51": hmdb51.read,
    "kinetics": kinetics.read,
}

__all__ = ["Dataset", "Rejected", "SourceError", "VideoRecord", "load_source"]


def load_source(prep: PrepSpec, base: str | Path) -> Dataset:
    """The dataset `prep.source` names; relative paths in `prep` are relative to `base` (the spec's workdir)."""
    dataset = READERS[prep.source](prep, Path(base).resolve())
    if not dataset.records:
        raise SourceError(f"prep.source {prep.source}: no usable video listed ({len(dataset.rejects)} rejected, "
                          f"first: {dataset.rejects[0].detail if dataset.rejects else 'none'})")
    return dataset

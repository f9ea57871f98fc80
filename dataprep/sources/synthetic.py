"""The `synthetic` source: the quickstart's motion dataset, made on first use, then read as a labels CSV."""

from __future__ import annotations

from pathlib import Path

from d3d_cluster.spec import PrepSpec
from dataprep.sources.labels_csv import read_labels_csv
from dataprep.sources.records import Dataset
from dataprep.synthetic import make_motion_dataset


def read(prep: PrepSpec, base: Path) -> Dataset:
    labels = base / prep.labels
    if not labels.exists():
        print(f"making the synthetic motion dataset in {labels.parent}", flush=True)
        labels = make_motion_dataset(prep.synthetic, labels.parent, seed=prep.seed)
    return read_labels_csv(labels)

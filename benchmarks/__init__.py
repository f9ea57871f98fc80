"""Benchmarks, each run as a module from the repository root (`python -m benchmarks.NAME`); see BENCHMARKS.md.

Every benchmark takes `--smoke`: the same code path at tiny sizes and one round, which tests/benchmarks runs so
that a change of API breaks a test rather than a benchmark found broken months later. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# The job spec a smoke run trains with (dotted overrides of the quickstart spec), as small as the tests' own:
# 3 classes of 6 videos of 12 frames at 32 px, Farneback flow, 8-frame clips cropped to 24 px, 2 clips per rank,
# one epoch per stage.
SMOKE_SPEC = {
    "prep.synthetic.classes": 3,
    "prep.synthetic.videos_per_class": 6,
    "prep.synthetic.frames": 12,
    "prep.synthetic.size": 32,
    "prep.synthetic.val_fraction": 0.34,
    "prep.short_side": 32,
    "prep.flow.algorithm": "farneback",
    "prep.shard_samples": 4,
    "prep.workers": 1,
    "data.clip_frames": 8,
    "data.crop_size": 24,
    "data.batch_size": 2,
    "deepspeed.global_batch_size": 4,
    "teacher.epochs": 1,
    "student.epochs": 1,
    "probe.views": 1,
}


def parse_args(parser: argparse.ArgumentParser, smoke: dict) -> argparse.Namespace:
    """The parser's arguments plus `--smoke`, which makes `smoke` the defaults: options given still win."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one round: checks that the benchmark runs (its figures mean nothing)")
    if parser.parse_known_args()[0].smoke:
        parser.set_defaults(**smoke)
    return parser.parse_args()


def prepare(spec) -> Path:
    """The spec's dataset prepared into its shards as `d3dc prep` does, unless they already are; the shards' path."""
    from d3d_cluster.launch.prep import prepare_locally

    shards = spec.path(spec.data.shards)
    if not (shards / "manifest.json").exists():
        prepare_locally(spec, progress=False)
    return shards


def data_layout(layout: str) -> dict:
    """`PIPELINESxTHREADS` (DALI pipelines a rank, threads each), `cpu` after it for DALI's CPU decoder on a GPU
    rank: the data spec's settings for it (`1x16cpu`)."""
    parsed = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)(cpu)?", layout)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"{layout!r} is not PIPELINESxTHREADS, with cpu after it for the CPU "
                                         f"decoder (2x4, 1x16cpu)")
    return {"pipelines": int(parsed[1]), "reader_threads": int(parsed[2]), "decoder": "cpu" if parsed[3] else "auto"}


def write_report(report: dict, out: str | Path) -> Path:
    """A benchmark's results as indented JSON at `out` (its folder made), said on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}", flush=True)
    return out

"""`d3dc verify`: every shard of a prepared directory against its manifest, the whole tar's SHA-256 and each
member's checksum, so bytes damaged after prep (a disk, a copy, a sync) are found before a run trains on them.

A shard is read twice, sequentially: once for its SHA-256, then member by member through a one-shard `SampleTable`,
whose reads check each member's checksum as the loader's do (the second pass mostly hits the page cache). Shards are
verified by processes in parallel; `launch.verify` gives slices of them to a Slurm array instead. A report is a
JSON-able dict per shard, so array tasks write theirs to files that are merged when read.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from d3d_cluster.data.index import CorruptMember, SampleTable
from d3d_cluster.data.schema import Manifest, ShardInfo, sha256_of


def shards_of(manifest: Manifest) -> list[ShardInfo]:
    """Every shard of every split, in the manifest's order: what array tasks slice."""
    return [shard for split in manifest.splits.values() for shard in split.shards]


def verify_shard(directory: str | Path, shard: ShardInfo) -> dict:
    """{"shard", "ok", "problems", "members_checked"}: each problem names the shard's file, and a damaged member its
    sample and ext; a schema 2 shard has no member checksums to check."""
    tar, index = Path(directory) / shard.path, Path(directory) / shard.index
    problems = []
    try:
        digest = sha256_of(tar)
        if digest != shard.sha256:
            problems.append(f"{tar}: SHA-256 {digest}, the manifest records {shard.sha256}")
        table = SampleTable([tar], [index], [shard.frames], labels=[shard.labels], checksums=[shard.checksums])
    except (OSError, ValueError) as error:  # a missing file, an index that is not one
        return {"shard": shard.path, "ok": False, "problems": problems + [str(error)],
                "members_checked": shard.checksums is not None}
    try:
        for sample in range(len(table)):
            for ext in table.members[sample]:
                try:
                    table.read(sample, ext)
                except (CorruptMember, OSError) as error:  # OSError: the member lies past the tar's end
                    problems.append(str(error))
    finally:
        table.close()
    return {"shard": shard.path, "ok": not problems, "problems": problems,
            "members_checked": shard.checksums is not None}


def verify_shards(directory: str | Path, shards: list[ShardInfo], workers: int = 1) -> list[dict]:
    """Reports of `shards`, in their order, from `workers` processes (this one for one worker)."""
    if workers == 1 or len(shards) <= 1:
        return [verify_shard(directory, shard) for shard in shards]
    with ProcessPoolExecutor(min(workers, len(shards)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(verify_shard, [str(directory)] * len(shards), shards, chunksize=4))


def summary_text(directory: str | Path, reports: list[dict]) -> str:
    damaged = [report for report in reports if not report["ok"]]
    unchecked = sum(not report["members_checked"] for report in reports)
    lines = [f"verified {directory}: {len(reports) - len(damaged)} shards ok, {len(damaged)} damaged"
             + (f" ({unchecked} without member checksums, schema 2: SHA-256 only)" if unchecked else "")]
    lines += [f"  {report['shard']}: {problem}" for report in damaged for problem in report["problems"]]
    return "\n".join(lines)

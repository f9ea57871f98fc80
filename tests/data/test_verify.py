import shutil

from click.testing import CliRunner

from d3d_cluster.cli import main
from d3d_cluster.data.index import SampleTable
from d3d_cluster.data.schema import FLOW_EXT, Manifest


def _verify(shards, *options):
    return CliRunner().invoke(main, ["verify", str(shards), "--cluster", "local", *options])


def test_a_clean_set_passes_every_shard(tiny_shards):
    result = _verify(tiny_shards, "--workers", "2")
    shards = sum(len(split.shards) for split in Manifest.load(tiny_shards).splits.values())
    assert result.exit_code == 0, result.output
    assert f"{shards} shards ok, 0 damaged" in result.output


def test_a_damaged_member_fails_naming_its_shard_sample_and_member(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    table = SampleTable.of_split(Manifest.load(shards), shards, "train")
    member, key = table.members[5][FLOW_EXT], table.keys[5]
    tar = table.tars[member.tar]
    table.close()
    with open(tar, "r+b") as handle:
        handle.seek(member.offset + member.size // 2)
        handle.write(b"\x00\x01\x02\x03")
    (shards / Manifest.load(shards).splits["val"].shards[0].index).unlink()

    result = _verify(shards, "--workers", "1")
    assert result.exit_code == 1, result.output
    assert "2 damaged" in result.output
    assert f"{tar}: SHA-256" in result.output
    assert f"{tar}: sample {key!r} member {FLOW_EXT}: CRC-32" in result.output
    assert "val-000000.idx" in result.output

import fnmatch
from pathlib import Path

import yaml

from d3d_cluster.launch.rundir import RunDir
from d3d_cluster.spec import Spec

CONFIG = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus" / "prometheus.yml"


def test_file_sd_glob_matches_the_target_files_runs_write(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = config["scrape_configs"]
    (pattern,) = job["file_sd_configs"][0]["files"]
    spec = Spec().with_overrides(workdir=str(tmp_path), name="any-run")
    target = RunDir(spec.run_dir).targets / "student-rank3.json"
    assert fnmatch.fnmatch(str(target.relative_to(tmp_path)), pattern)

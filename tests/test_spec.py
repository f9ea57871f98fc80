from pathlib import Path

import pytest
import yaml

from d3d_cluster.spec import Spec, SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_job_file_is_the_embedded_default_with_every_setting_written_out():
    assert load_spec(REPO / "jobs" / "quickstart.yaml") == Spec()
    assert yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text()) == Spec().model_dump(mode="json")


def test_default_spec_accumulates_nothing_at_two_ranks():
    spec = Spec()
    assert spec.world_size == 2 and spec.grad_accumulation == 1


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"teacher": {"optimzer": {}}}, "unknown key teacher.optimzer (expected one of: epochs, optimizer, init)"),
        ({"student": {"distill": {"weight": -1}}}, "student.distill.weight: Input should be greater than or equal to 0"),
        ({"cluster": {"executor": "k8s"}}, "cluster.executor: Input should be 'auto', 'local' or 'slurm' (got 'k8s')"),
        ({"data": {"crop_size": "big"}}, "data.crop_size: Input should be a valid integer"),
        ({"deepspeed": {"global_batch_size": 24}}, "must be a multiple of data.batch_size x world size (16 x 2 = 32)"),
        ({"data": {"crop_size": 96}}, "data.crop_size (96) exceeds prep.short_side (64)"),
        ({"data": {"clip_frames": 20}}, "data.clip_frames (20) with data.frame_stride (1) needs 21 video frames"),
        ({"prep": {"frame_size": [32, 48]}, "data": {"crop_size": 40}}, "data.crop_size (40) exceeds prep.frame_size (32)"),
        ({"prep": {"frame_size": [224, 225]}}, "prep.frame_size: Value error, must be [height, width], both even"),
        ({"prep": {"source": "youtube"}}, "prep.source: Input should be 'synthetic', 'csv', 'ucf101', 'hmdb51' or 'kinetics'"),
        ({"name": "has space"}, "name: String should match pattern"),
        ({"cluster": {"executor": "local", "nodes": 2}}, "cluster.nodes is 2: the local executor runs on one node"),
        ({"cluster": {"executor": "slurm", "gpus_per_node": 4}},
         "cluster.gpus_per_node (4) must equal cluster.tasks_per_node (2): one rank per GPU"),
        ({"cluster": {"gpus_per_node": 2, "device": "cpu"}},
         "cluster.gpus_per_node (2) asks Slurm for GPUs that cluster.device cpu would leave idle"),
        ({"cluster": {"device": "rocm"}}, "cluster.device: Input should be 'auto', 'cuda' or 'cpu'"),
        ({"cluster": {"mem": "lots"}}, "cluster.mem: String should match pattern"),
        ({"cluster": {"signal_delay_s": 600, "timeout_min": 10}},
         "cluster.signal_delay_s (600) must be shorter than cluster.timeout_min (10 min)"),
        ({"metrics": {"bind": "node01"}}, "metrics.bind: Value error, must be an IP address"),
        ({"teacher": {"optimizer": {"schedule": "step"}}}, "teacher.optimizer: Value error, schedule step needs decay_epochs"),
        ({"checkpoint": {"every_steps": 0}}, "checkpoint.every_steps: Input should be greater than or equal to 1"),
        ({"metrics": {"pushgateway": "gateway:9091"}}, "metrics.pushgateway: Value error, must be an http(s) URL"),
        ({"metrics": {"port": 70000}}, "metrics.port: Input should be less than or equal to 65535"),
        ({"student": {"distill": {"loss": "kl", "target": "mixed_5c"}}}, "loss kl compares class distributions"),
        ({"student": {"distill": {"temperature": 0}}}, "student.distill.temperature: Input should be greater than 0"),
        ({"teacher": {"init": {"path": "in1k.pt", "format": "inception_v1_2d"}}},
         "teacher.init.format inception_v1_2d needs model.width 1.0 (got 0.25)"),
        ({"student": {"init": {"path": "s3d.pt", "format": "torchvision_s3d"}}},
         "student.init.format torchvision_s3d needs model.width 1.0 (got 0.25)"),
        ({"workdir": "/data\n#SBATCH --wrap=id"}, "workdir: '/data\\n#SBATCH --wrap=id' holds a control character"),
        ({"cluster": {"qos": "high qos"}}, "cluster.qos: String should match pattern"),
        ({"teacher": {"init": {"format": "caffe"}}}, "teacher.init.format: Input should be 's3dg', 'torchvision_s3d' or 'inception_v1_2d'"),
        ({"probe": {"layers": ["mixed_6a"]}}, "probe.layers.0: Input should be 'conv_1a'"),
        ({"probe": {"epochs": 4, "views": 8}}, "probe: Value error, probe.views (8) exceeds probe.epochs (4)"),
        ({"cluster": {"sbatch_options": {"nodes": 4}}}, "cluster.sbatch_options: Value error, nodes is set by "
                                                          "cluster.nodes"),
        ({"cluster": {"sbatch_options": {"output": "/tmp/x"}}}, "output is set by d3dc and submitit"),
        ({"cluster": {"sbatch_options": {"comment": "two words"}}}, "'two words': a value without spaces"),
        ({"cluster": {"sbatch_options": {"Mail_Type": "END"}}}, "'Mail_Type' is not an sbatch option name"),
        ({"cluster": {"setup": ["module load cuda\nrm -rf ~"]}}, "cluster.setup.0: 'module load cuda\\nrm -rf ~' "
                                                                 "holds a control character"),
        ({"data": {"mirror": False, "mirror_pairs": [["left", "right"]]}},
         "data: Value error, mirror_pairs is set but mirror is false"),
        ({"data": {"mirror_pairs": [["left", "left"]]}}, "data.mirror_pairs: Value error, each pair must name two"),
        ({"data": {"mirror_pairs": [["left", "right"], ["right", "up"]]}}, "class 'right' is in more than one pair"),
        ({"prep": {"synthetic": {"kind": "dots"}}}, "prep.synthetic.kind dots: its classes are directions, and a "
                                                    "mirrored clip of east shows west; set data.mirror: false"),
        ({"student": {"distill": {"target": "mixed_6a"}}}, "student.distill.target: Input should be 'logits', 'conv_1a'"),
    ],
)
def test_bad_values_are_refused_naming_file_and_key(tree, message):
    with pytest.raises(SpecError) as error:
        parse_spec(tree, source="jobs/mine.yaml")
    assert str(error.value).startswith("jobs/mine.yaml: ")
    assert message in str(error.value)


def test_load_names_the_file_for_broken_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("teacher: [unclosed\n")
    with pytest.raises(SpecError, match=f"{path}: not valid YAML"):
        load_spec(path)


def test_a_spec_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="a spec is a mapping of sections, got list"):
        load_spec(path)


def test_overrides_are_validated_again():
    spec = Spec().with_overrides(**{"cluster.tasks_per_node": 1})
    assert spec.world_size == 1 and spec.grad_accumulation == 2
    with pytest.raises(SpecError, match="cluster.tasks_per_node"):
        Spec().with_overrides(**{"cluster.tasks_per_node": 0})


def test_spec_is_frozen_and_round_trips_through_yaml(tmp_path):
    spec = Spec().with_overrides(name="other", seed=3)
    with pytest.raises(Exception):
        spec.seed = 4
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    assert load_spec(path) == spec
    assert yaml.safe_load(spec.to_yaml())["name"] == "other"


def test_paths_resolve_against_the_workdir(tmp_path):
    spec = Spec().with_overrides(workdir=str(tmp_path))
    assert spec.path(spec.data.shards) == tmp_path / "shards"
    assert spec.run_dir == tmp_path / "runs" / "quickstart"

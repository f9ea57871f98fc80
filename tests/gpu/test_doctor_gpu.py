"""`d3dc doctor` on a real GPU: a spec that asks for one is served by cuda:0 with NCCL, bf16 autocast, DeepSpeed's
CUDA accelerator and DALI's mixed (NVDEC) decoder. Skipped where CUDA is absent, as on CI."""

import pytest
import torch

from d3d_cluster.launch.doctor import node_report
from d3d_cluster.spec import Spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_on_a_gpu_the_doctor_reports_cuda_nccl_bf16_and_the_mixed_decoder():
    report = node_report(Spec(cluster={"device": "cuda", "tasks_per_node": 1}))
    checks = {check["name"]: check for check in report["checks"]}
    print("\n".join(f"{name}: {check['status']}: {check['detail']}" for name, check in checks.items()))
    assert checks["stage"]["status"] == "ok"
    assert checks["stage"]["detail"] == ("device cuda:0 for the node's 1 rank, process group nccl, precision bfloat16 "
                                         "autocast, fp32 weights")
    assert checks["gpus"]["status"] == "ok" and checks["nccl"]["status"] == "ok"
    assert checks["deepspeed"]["status"] == "ok" and "accelerator cuda (nccl)" in checks["deepspeed"]["detail"]
    nvdec = checks["nvdec"]
    # The GPU machine may lack PyAV, which makes the sample: then the decoder cannot be tried, and says so.
    assert nvdec["status"] == "ok" or (nvdec["status"] == "warn" and "no VP9 sample" in nvdec["detail"]), nvdec

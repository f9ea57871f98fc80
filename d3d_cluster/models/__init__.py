"""S3D-G networks, the D3D distillation loss, initial weights and cost accounting."""
from d3d_cluster.models.distill import D3DLoss, FeatureDistillation, d3d_loss, teacher_target
from d3d_cluster.models.s3dg import S3DG

__all__ = ["D3DLoss", "FeatureDistillation", "S3DG", "d3d_loss", "teacher_target"]

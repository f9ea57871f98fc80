"""S3D-G networks and the D3D distillation loss."""
from d3d_cluster.models.distill import D3DLoss, d3d_loss
from d3d_cluster.models.s3dg import S3DG

__all__ = ["D3DLoss", "S3DG", "d3d_loss"]

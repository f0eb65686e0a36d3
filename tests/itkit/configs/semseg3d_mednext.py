# ruff: noqa: F403, F405
"""A small ITKIT ``SemSeg3D`` with a MedNeXt backbone, written like ITKIT's example configs.

``inference_config`` has the keys ITKIT reads. It gives no ``patch_size``: ITKIT then runs
the whole volume in one forward pass, and so does itk_infer, which makes the two tools'
labels comparable voxel for voxel (ITKIT's sliding window accumulates in float16).
"""

from mmengine.config import read_base

with read_base():
    from .itkit_base import *

from itkit.criterions.segment import DiceCELoss_3D
from itkit.mm.task_models import SemSeg3D
from itkit.models.MedNeXt import MedNeXt

model = dict(
    type=SemSeg3D,
    num_classes=num_classes,
    binary_segment_threshold=None,
    backbone=dict(
        type=MedNeXt,
        in_channels=in_channels,
        n_channels=4,
        n_classes=num_classes,
        exp_r=2,
        kernel_size=3,
        block_counts=[1, 1, 1, 1, 1, 1, 1, 1, 1],
    ),
    criterion=dict(type=DiceCELoss_3D, to_onehot_y=True, softmax=True, batch=True),
    inference_config=dict(
        accumulate_device="cuda",
        forward_device="cuda",
        forward_batch_windows=2,
        argmax_batchsize=8,
    ),
)

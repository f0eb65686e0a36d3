"""Training settings of the ITKIT interoperability test, in the layout of ITKIT's own example
configs: a pure-Python ("lazy import") base file that the model config reads with
``read_base()``. Everything here is imported lazily, so itk_infer, which only builds
``model``, never imports the training-only parts (the synthetic data set, hooks, optimizer).
"""

from itkit.mm.mmeng_PlugIn import RuntimeInfoHook
from itkit.mm.mmseg_Dev3D import PackSeg3DInputs
from itkit.process.GeneralPreProcess import TypeConvert, WindowSet
from mmengine.dataset.sampler import InfiniteSampler
from mmengine.dataset.utils import default_collate
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import OptimWrapper
from mmengine.runner import IterBasedTrainLoop
from torch.optim.adamw import AdamW

from tests.itkit.synthetic import SyntheticCT

# Model and data
in_channels = 1
num_classes = 3
wl = 40  # window level (read by itk_infer)
ww = 400  # window width (read by itk_infer)
size = (32, 48, 64)  # [Z, Y, X]: a multiple of 16 for the network's four down-samplings

# Training: a few iterations only; the test compares inference, not accuracy.
iters = 2
train_pipeline = [
    dict(type=WindowSet, level=wl, width=ww),
    dict(type=TypeConvert, key=["img"], dtype="float32"),
    dict(type=PackSeg3DInputs, meta_keys=("img_shape",)),
]
train_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type=InfiniteSampler, shuffle=False),
    collate_fn=dict(type=default_collate),
    dataset=dict(type=SyntheticCT, pipeline=train_pipeline, shape=size, num_volumes=2),
)
train_cfg = dict(type=IterBasedTrainLoop, max_iters=iters, val_interval=iters + 1)
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr=1e-3))
default_hooks = dict(
    runtime_info=dict(type=RuntimeInfoHook),
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, interval=1, log_metric_by_epoch=False),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=iters, max_keep_ckpts=1),
)
log_processor = dict(by_epoch=False)
launcher = "none"
env_cfg = dict(mp_cfg=dict(mp_start_method="fork"), dist_cfg=dict(backend="gloo"))
randomness = dict(seed=0)

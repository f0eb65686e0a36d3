"""MMEngine config of the demo U-Net (same weights and settings as examples/demo/model.onnx).

Run, from any folder:
    itk_infer -i IN -o OUT --backend mmengine \
        -cfg examples/demo/mmengine_config.py -ckpt examples/demo/mmengine_checkpoint.pth
"""

# Registers DemoSegmentor and UNet3D; itk_infer finds the `examples` package two folders up.
custom_imports = dict(imports=["examples.mmengine_model"], allow_failed_imports=False)

# Intensity window (HU) the model was trained with: [-1000, 1000].
wl = 0.0
ww = 2000.0

num_classes = 6
# Label names by value (examples/phantoms.py CLASS_NAMES); records and xlsx use them.
labels = dict(background=0, body=1, lung=2, fat=3, vessel=4, bone=5)

model = dict(
    type="DemoSegmentor",
    num_classes=num_classes,
    backbone=dict(type="UNet3D", in_channels=1, base_channels=8),
    # Sliding window (Z, Y, X): training patch, half-patch stride, two windows per forward.
    inference_config=dict(
        patch_size=[32, 64, 64],
        patch_stride=[16, 32, 32],
        forward_batch_windows=2,
    ),
)

"""Virtual try-on (VTON-HD style): the garment image is the reference; the person image
is noised and scored only inside the garment region mask (docs/method.md, "Training").

    python train.py --config=configs/tryon.py --workdir=runs/tryon \
        --config.data.pipeline.data_dir=/data/vton_array_record ...

Records carry the region mask (``region_masks``); the pipeline returns it as
``region_mask`` and the loss becomes ||M (target - prediction)||^2.
"""
from configs.sd15_image import get_config as image_config


def get_config():
    c = image_config()
    c.data.pipeline.update(resolution=(512, 512), clip_length=1, with_region_mask=True, flip_probability=0.0)
    c.train.update(tryon=True)
    return c

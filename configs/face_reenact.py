"""Face reenactment on CPU (the paper's third application): facial landmarks drive a face.

    python train.py --config=configs/face_reenact.py --workdir=runs/face

The demo's model and schedule (configs/demo.py) with faces for people: the pose is the
68 iBUG landmarks (layout face68, drawn as coloured polylines by the one renderer), the
data synthetic faces (consist_jax.data.synthetic, kind="faces": head turns and tilts, a
talking mouth, blinks), generated on first use. For real faces, build a dataset with
``--layout=face68`` (consist_jax.data.build_own, or BuildOptions(layout="face68") for the
local-videos builders) and set data.pipeline.data_dir to it.

Crops stay whole (crop_scale 1): the landmarks are the whole pose, and a crop that cuts
the jaw off would leave the pose image without the face's outline.
"""
import os

from configs.demo import get_config as demo_config


def get_config():
    c = demo_config()
    c.data.synthetic = dict(generate=True, kind="faces", identities=200, frames=48, size=32,
                            seed=0, workers=0)
    c.data.pipeline.update(data_dir=os.path.join("data_cache", "synthetic_faces_32"))
    return c

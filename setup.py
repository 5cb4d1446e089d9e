"""consist_jax: Spatially Conditioned Diffusion (SCD) in JAX/Flax."""
from setuptools import find_packages, setup

# Lower bounds are the versions the test suite was run against (2026-11).
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "ml-collections>=1.1.0",
    "safetensors>=0.8.0",
    "ml-dtypes>=0.7.0",  # bfloat16 safetensors weights (convert/loading.py)
    "numpy>=2.0",
    "pillow>=10.0",
    "imageio>=2.38",
    "imageio-ffmpeg>=0.8",
    "tqdm>=4.66",
    "tensorboardx>=2.6.5",
    "absl-py>=2.1",
    "matplotlib>=3.11",  # evaluate.py's metric curve (consist_jax/eval/figures.py, Agg)
]

EXTRAS = {
    # Oracles for parity tests; torch's CPU build is the one the machines here carry.
    "test": [
        "pytest>=9.0",
        # Bounded, derandomized fuzzing of the readers of user files (tests/test_fuzz_*.py).
        "hypothesis>=6.170",
        "torch==2.13.0",
        "diffusers>=0.42.1",
        "transformers>=5.24.0",
        "scipy>=1.17",
        "scikit-image>=0.26",
        # The TFDS wrappers' test builds a dataset (no TensorFlow needed for that).
        "tensorflow-datasets>=4.9.10",
        "importlib_resources>=6.0",
        # The package's import contracts (.importlinter), checked by tests/test_layering.py.
        "import-linter>=2.17",
        # Ahead-of-time TPU compiles from a CPU host (test_compile_report.py): libtpu
        # describes TPU topologies; jax 0.10.2's tpu extra pins libtpu 0.0.42.
        "jax[tpu]==0.10.2",
        # Pose extraction's tests build tiny ONNX models and run them (test_pose_extract.py).
        "onnx>=1.23",
        "onnxruntime>=1.32",
        # The web page's end-to-end test (test_app.py) drives Debian's chromium (scripts/test.sh
        # installs it) with playwright; `playwright install` (a CDN download) is never needed.
        "gradio>=6.31.0",
        "playwright>=1.65.2",
    ],
    # Only needed to build the TFDS datasets from a local copy of TikTok / UBC Fashion;
    # tensorflow_datasets writes array_record without TensorFlow.
    "data": ["tensorflow-datasets>=4.9.10", "importlib_resources>=6.0"],
    # Pose extraction from videos (consist_jax.poses.extract, data.build_own): the published
    # YOLOX + DWPose/RTMW ONNX models run with onnxruntime (onnxruntime-gpu works as well).
    "pose": ["onnxruntime>=1.32"],
    # The web page (python -m consist_jax.app).
    "app": ["gradio>=6.31.0"],
}

setup(
    name="consist_jax",
    version="0.1.0",
    description="Spatially Conditioned Diffusion (consistent human image and video generation) in JAX/Flax",
    packages=find_packages(include=["consist_jax", "consist_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

"""A web page for sampling: upload a reference photo and poses, get the video back.

    python -m consist_jax.app --checkpoint=runs/demo [--port=7860] [--examples=outputs/demo/examples]

Serves a gradio page on 127.0.0.1 (nothing is fetched from the internet: no analytics,
no share link, the theme's fonts are served locally). The checkpoint is loaded once; each
setting compiles once and later requests reuse it. The page reads its inputs with the
same function as sample.py (``sampling.inputs.read_inputs``) and samples with the same
pipeline, so the PNG frames it offers equal sample.py's ``--out=FOLDER`` frames for the
same inputs and settings (the MP4s are H.264, which is lossy).

Poses: one pose video or keypoints file, or several pose images / per-frame OpenPose JSON
files (ordered by name, as sample.py orders a folder), or one of ``--examples``' folders
(evaluate.py's ``examples/``: reference.png, reference_pose.png, poses/).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import zipfile
from typing import Optional, Sequence

from consist_jax import cli, files

DEFAULT_EXAMPLES = os.path.join("outputs", "demo", "examples")
UPLOAD = "(upload your own)"
ALIGN_MODES = ("off", "global", "per_limb")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's numbers, as sample.py's flags of the same names."""
    steps: int = 25
    guidance: float = 3.0
    seed: int = 0
    align_poses: str = "off"
    sampler: str = ""  # "": the checkpoint's kind's default (ddim; flow_unipc for flow)
    window: int = 24
    overlap: int = 4
    fps: float = 12.0


def example_folders(folder: Optional[str]) -> dict[str, str]:
    """{name: path} of the example folders under ``folder`` (evaluate.py's layout)."""
    if folder is None:
        return {}
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"--examples={folder!r}: not a folder")
    found = {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))
             if os.path.isfile(os.path.join(folder, name, "reference.png"))
             and os.path.isdir(os.path.join(folder, name, "poses"))}
    if not found:
        raise ValueError(f"--examples={folder!r} holds no example folder (NAME/reference.png and NAME/poses/)")
    return found


def example_paths(folder: str) -> tuple[str, Optional[str], str]:
    """(reference, reference pose or None, poses) of one example folder."""
    ref_pose = os.path.join(folder, "reference_pose.png")
    return (os.path.join(folder, "reference.png"), ref_pose if os.path.isfile(ref_pose) else None,
            os.path.join(folder, "poses"))


def poses_path(uploads: Sequence[str], workdir: str) -> str:
    """Uploaded pose files -> what sample.py's ``--poses`` takes: one video or keypoints file
    as it is; several files (pose images, per-frame JSONs) copied into a folder by name."""
    from consist_jax.images import VIDEO_SUFFIXES
    from consist_jax.poses.io import KEYPOINT_SUFFIXES

    if not uploads:
        raise ValueError("poses: upload a pose video, a keypoints file or pose images, or pick an example")
    if len(uploads) == 1 and uploads[0].lower().endswith(VIDEO_SUFFIXES + KEYPOINT_SUFFIXES):
        return uploads[0]
    folder = os.path.join(workdir, "poses")
    files.ensure_folder(folder)
    for path in uploads:
        target = os.path.join(folder, os.path.basename(path))
        if os.path.exists(target):
            raise ValueError(f"poses: two uploaded files are named {os.path.basename(path)!r}")
        try:
            shutil.copyfile(path, target)
        except OSError as e:  # a full disk: a user error shown in one line, not a bug
            raise files.WriteError(f"cannot copy the upload {path!r} to {target!r}: {e.strerror or e}") from e
    return folder


def write_archive(path: str, folder: str, comment: bytes = b"") -> None:
    """The files of ``folder`` (PNG frames) -> a ZIP at ``path``, stored (PNGs are compressed
    already), written atomically and read back: the names, and every member's CRC."""
    names = sorted(os.listdir(folder))

    def reads_back(tmp):
        with zipfile.ZipFile(tmp) as zf:
            if zf.namelist() != names or zf.testzip() is not None:
                raise ValueError("the archive does not read back as written")

    with files.atomic_path(path, reads_back) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.comment = comment
            for name in names:
                zf.write(os.path.join(folder, name), name)


def write_outputs(workdir: str, reference, poses, frames, fps: float) -> tuple[str, list[str]]:
    """(side-by-side MP4 to show, [result MP4, ZIP of lossless PNG frames] to download), each
    written atomically and read back (a failed write is a WriteError naming the file)."""
    from consist_jax.sampling import io

    shown = os.path.join(workdir, "side_by_side.mp4")
    io.write_video(shown, io.side_by_side(reference, poses, frames), fps)
    result = os.path.join(workdir, "result.mp4")
    io.write_video(result, frames, fps)
    png_folder = os.path.join(workdir, "frames")
    io.write_video(png_folder, frames, fps)  # no suffix: PNG frames
    archive = os.path.join(workdir, "result_frames.zip")
    # gradio serves files under a hash of their bytes: the request's own folder name makes
    # each archive a new download link, even when two requests give the same frames.
    write_archive(archive, png_folder, comment=os.path.basename(workdir).encode())
    return shown, [result, archive]


class Generator:
    """One loaded pipeline serving every request (gradio runs one request at a time)."""

    def __init__(self, pipe, outputs_root: str, examples: dict[str, str],
                 pose_detector: Optional[str] = None, pose_model: Optional[str] = None):
        self.pipe, self.outputs_root, self.examples = pipe, outputs_root, examples
        self.pose_detector, self.pose_model = pose_detector, pose_model

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers of the checkpoint's diffusion kind, its default first."""
        from consist_jax.diffusion.kinds import SAMPLERS, schedule_kind

        return SAMPLERS[schedule_kind(self.pipe.schedule)]

    def generate(self, reference: Optional[str], reference_pose: Optional[str], pose_uploads: Sequence[str],
                 example: Optional[str], settings: Settings) -> tuple[str, list[str]]:
        """File paths in (an example overrides the uploads) -> write_outputs' paths."""
        from consist_jax.sampling import inputs, io

        workdir = tempfile.mkdtemp(dir=self.outputs_root)
        if example and example != UPLOAD:
            reference, reference_pose, poses = example_paths(self.examples[example])
        else:
            if not reference:
                raise ValueError("reference: upload a photo of the person, or pick an example")
            poses = poses_path(pose_uploads or [], workdir)
        reference, ref_pose, pose_images = inputs.read_inputs(
            self.pipe.resolution, reference, poses, reference_pose or None, settings.align_poses,
            self.pose_detector, self.pose_model, out=os.path.join(workdir, "result.mp4"))
        io.check_output(os.path.join(workdir, "result.mp4"), settings.fps, "frames per second",
                        frame_size=self.pipe.resolution)  # before the compile, as sample.py
        frames = self.pipe(reference, pose_images, reference_pose=ref_pose, steps=settings.steps,
                           guidance=settings.guidance, seed=settings.seed, sampler=settings.sampler,
                           window=settings.window, overlap=settings.overlap, progress=True)
        return write_outputs(workdir, reference, pose_images, frames, settings.fps)


def _number(name: str, value, kind):
    """A number field's value as ``kind``; an emptied field is a user error."""
    if value is None:
        raise ValueError(f"{name}: enter a number")
    return kind(value)


def build_page(generator: Generator):
    """The gradio Blocks page; its one event calls ``generator.generate``."""
    import gradio as gr

    def on_generate(reference, reference_pose, pose_uploads, example, steps, guidance, seed, align,
                    sampler, window, overlap, fps, progress=gr.Progress(track_tqdm=True)):
        try:
            settings = Settings(_number("steps", steps, int), _number("guidance", guidance, float),
                                _number("seed", seed, int), align, sampler, _number("window", window, int),
                                _number("overlap", overlap, int), _number("frames per second", fps, float))
            return generator.generate(reference, reference_pose, pose_uploads, example, settings)
        except Exception as e:
            if cli.is_user_error(e):  # shown on the page in one line; a bug keeps its traceback
                raise gr.Error(cli.one_line(e).removeprefix("error: ")) from e
            raise

    with gr.Blocks(title="consist_jax: animate a reference person") as page:
        gr.Markdown("## Animate a reference person\nUpload a photo and a pose sequence (or pick an example), "
                    "then Generate. Shown: reference | pose | result.")
        with gr.Row():
            with gr.Column():
                example = gr.Dropdown([UPLOAD, *generator.examples], value=UPLOAD, label="Example",
                                      elem_id="example", visible=bool(generator.examples))
                reference = gr.Image(type="filepath", label="Reference photo", elem_id="reference")
                reference_pose = gr.File(label="Reference pose (image or keypoints file; optional)",
                                         type="filepath", elem_id="reference_pose")
                poses = gr.File(label="Poses: a pose video, a keypoints file, or pose images",
                                file_count="multiple", type="filepath", elem_id="poses")
                steps = gr.Slider(1, 100, value=Settings.steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Number(Settings.guidance, label="Guidance", elem_id="guidance")
                seed = gr.Number(Settings.seed, precision=0, label="Seed", elem_id="seed")
                align = gr.Radio(list(ALIGN_MODES), value=Settings.align_poses, elem_id="align",
                                 label="Align the poses to the reference (keypoint inputs)")
                with gr.Accordion("Advanced", open=False):
                    sampler = gr.Dropdown(list(generator.samplers), value=generator.samplers[0], label="Sampler",
                                          elem_id="sampler")
                    window = gr.Number(Settings.window, precision=0, label="Frames per window", elem_id="window")
                    overlap = gr.Number(Settings.overlap, precision=0, label="Window overlap", elem_id="overlap")
                    fps = gr.Number(Settings.fps, label="Frames per second", elem_id="fps")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="reference | pose | result", interactive=False, elem_id="video")
                downloads = gr.File(label="Download: result.mp4, lossless PNG frames (zip)", interactive=False,
                                    elem_id="downloads")
        button.click(on_generate, [reference, reference_pose, poses, example, steps, guidance, seed, align,
                                   sampler, window, overlap, fps], [video, downloads])
    return page


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a train.py workdir (its latest checkpoint)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no_ema", action="store_true", help="the raw parameters instead of the EMA ones")
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1")
    parser.add_argument("--examples", default=None,
                        help=f"example folders to offer (default: {DEFAULT_EXAMPLES} when it exists)")
    parser.add_argument("--pose_detector", help="YOLOX ONNX file: extract poses from an uploaded real video")
    parser.add_argument("--pose_model", help="whole-body pose ONNX file, with --pose_detector")
    args = parser.parse_args(argv)

    def run(_):
        from consist_jax import checks

        checks.positive_int("--port", args.port, 65535)
        if args.step is not None:
            checks.non_negative_int("--step", args.step)
        if bool(args.pose_detector) != bool(args.pose_model):
            raise ValueError("pose extraction needs both --pose_detector and --pose_model")
        examples = example_folders(args.examples if args.examples is not None else
                                   DEFAULT_EXAMPLES if os.path.isdir(DEFAULT_EXAMPLES) else None)
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home
        try:
            import gradio  # noqa: F401  (a missing extra fails here, before the checkpoint loads)
        except ImportError as e:
            raise ValueError(f"the web page needs gradio ({e}): pip install -e '.[app]'") from e

        from consist_jax.sampling.pipeline import SCDPipeline

        pipe = SCDPipeline.from_checkpoint(args.checkpoint, args.step, not args.no_ema)
        cli.keep_freed_memory_on_cpu()
        with tempfile.TemporaryDirectory(prefix="consist_app_") as outputs_root:
            page = build_page(Generator(pipe, outputs_root, examples, args.pose_detector, args.pose_model))
            print(f"serving on http://127.0.0.1:{args.port}", flush=True)
            page.queue().launch(server_name="127.0.0.1", server_port=args.port, share=False,
                                allowed_paths=[outputs_root], show_error=True)

    cli.reports_user_errors(run)(argv)


if __name__ == "__main__":
    main(sys.argv[1:])

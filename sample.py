"""Generate a video of the reference person following a pose sequence.

    python sample.py --checkpoint=runs/demo --reference=ref.png --reference_pose=ref_pose.json \
        --poses=<folder of pose images | pose video | keypoints file> --out=out.mp4 \
        --steps=25 --guidance=3.0 --seed=0 [--align_poses=per_limb] [--side_by_side]

A caption-conditioned model (model.context.kind "text", e.g. SCD on Wan) also takes its
caption: ``--caption_embeddings=DIR --caption_id=ID`` (a folder data/text_embeddings.py
wrote, as training read), or ``--caption=TEXT --text_encoder=DIR`` (a local UMT5 folder,
encoded once; nothing is downloaded); the unconditional branch's context is zeros, as
training drops the caption, unless ``--negative_caption_id`` / ``--negative_caption``.

The same seed gives the same video (``--out`` without a suffix writes lossless PNG
frames, e.g. to compare runs bit for bit). The reference can be any photo (any size,
phone orientation, transparency, 16-bit); it and the poses are fitted to the model's
resolution around the person, each on its own when their canvases differ (a warning says
so when their aspect ratios differ). Everything is checked before any compile: a
bad flag or input prints one line and exits 2 (CONSIST_TRACEBACK=1 or --verbosity=1
shows the traceback); a failed write leaves no file and exits 2.
"""
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from consist_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A train.py workdir (its latest checkpoint is used).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the checkpoint has them.")
flags.DEFINE_string("reference", None, "Reference image of the person.")
flags.DEFINE_string("reference_pose", None, "The reference's pose: a keypoints file or a pose image.")
flags.DEFINE_string("poses", None, "Target poses: a folder of pose images, a pose video, or a keypoints file; "
                    "with --pose_detector and --pose_model, a video (or image folder) of a real person.")
flags.DEFINE_string("pose_detector", None, "YOLOX ONNX file (yolox_l.onnx): extract --poses from a real video.")
flags.DEFINE_string("pose_model", None, "Whole-body pose ONNX file (dw-ll_ucoco_384.onnx), with --pose_detector.")
flags.DEFINE_string("out", "out.mp4", "Output video (.mp4 or .gif) or a folder for PNG frames.")
flags.DEFINE_integer("steps", None, "Denoising steps (default: the checkpoint's run config's sample.steps).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: its sample.guidance).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_enum("sampler", None, ["ddim", "dpmpp_2m", "euler", "flow_unipc", "flow_euler"],
                  "Sampler (default: the checkpoint's diffusion.kind's: ddim, or flow_unipc for flow matching).")
flags.DEFINE_integer("window", 24, "Frames per temporal window (latent frames under Wan's VAE).")
flags.DEFINE_integer("overlap", 4, "Frames shared by consecutive windows (latent frames under Wan's VAE).")
flags.DEFINE_enum("align_poses", "off", ["off", "global", "per_limb"],
                  "Rescale the driving skeleton to the reference's proportions (keypoint inputs).")
flags.DEFINE_bool("side_by_side", False, "Write reference | pose | result.")
flags.DEFINE_float("fps", 12.0, "Output frame rate.")
flags.DEFINE_string("caption_embeddings", None, "A text-embeddings folder (data/text_embeddings.py) holding "
                    "--caption_id: the caption of a text-conditioned model (model.context.kind 'text').")
flags.DEFINE_string("caption_id", None, "The caption's id in --caption_embeddings.")
flags.DEFINE_string("negative_caption_id", None, "The unconditional branch's caption id in --caption_embeddings "
                    "(default: zeros, as training drops the caption).")
flags.DEFINE_string("caption", None, "A caption to encode once with --text_encoder (instead of --caption_id).")
flags.DEFINE_string("negative_caption", None, "The unconditional branch's caption, encoded with --text_encoder "
                    "(default: zeros, as training drops the caption).")
flags.DEFINE_string("text_encoder", None, "A local folder with a transformers UMT5EncoderModel (config.json, "
                    "safetensors) and its tokenizer files, for --caption (convert/caption_encoder.py).")
flags.DEFINE_integer("caption_length", 512, "Tokens a --caption is padded to (Wan: 512); with --caption_embeddings "
                     "the folder's max_length applies.")
flags.mark_flags_as_required(["checkpoint", "reference", "poses"])


def check_flags() -> None:
    """The numbers and the output path, before the checkpoint is loaded (no compile yet)."""
    from consist_jax import checks
    from consist_jax.sampling import io

    checks.check_sample_settings("--", steps=FLAGS.steps, guidance=FLAGS.guidance, window=FLAGS.window,
                                 overlap=FLAGS.overlap, seed=FLAGS.seed)
    if FLAGS.step is not None:
        checks.non_negative_int("--step", FLAGS.step)
    io.check_output(FLAGS.out, FLAGS.fps, fps_name="--fps")
    check_caption_flags()


def check_caption_flags() -> None:
    """Each caption flag comes with its source: an embeddings folder or a text encoder, not both."""
    from consist_jax import checks

    stored, texts = (FLAGS.caption_id, FLAGS.negative_caption_id), (FLAGS.caption, FLAGS.negative_caption)
    if any(f is not None for f in stored) != (FLAGS.caption_embeddings is not None):
        raise ValueError("--caption_embeddings=DIR goes with --caption_id (and optionally --negative_caption_id)")
    if any(t is not None for t in texts) != (FLAGS.text_encoder is not None):
        raise ValueError("--text_encoder=DIR goes with --caption (and optionally --negative_caption)")
    if FLAGS.caption_embeddings is not None and FLAGS.text_encoder is not None:
        raise ValueError("give the caption as --caption_embeddings with --caption_id, or as --text_encoder with "
                         "--caption, not both")
    if (FLAGS.caption_embeddings is not None and FLAGS.caption_id is None) or (
            FLAGS.text_encoder is not None and FLAGS.caption is None):
        raise ValueError("a negative caption needs the caption itself (--caption_id / --caption)")
    checks.positive_int("--caption_length", FLAGS.caption_length)


def read_caption_contexts():
    """(context, negative_context): (L, D) float32 caption embeddings from the caption flags
    (a negative one None: zeros), or (None, None) without caption flags."""
    from consist_jax.convert.caption_encoder import encode_captions
    from consist_jax.data import text_embeddings as te

    if FLAGS.caption_embeddings is not None:
        table = te.TextEmbeddings(FLAGS.caption_embeddings)
        ids = (FLAGS.caption_id, FLAGS.negative_caption_id)
        return tuple(None if i is None else table.lookup(i)[0] for i in ids)
    if FLAGS.text_encoder is not None:
        texts = {"caption": FLAGS.caption, "negative": FLAGS.negative_caption}
        encoded = encode_captions(FLAGS.text_encoder, {k: t for k, t in texts.items() if t is not None},
                                  FLAGS.caption_length)
        return encoded["caption"], encoded.get("negative")
    return None, None


@cli.reports_user_errors
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from consist_jax.diffusion.kinds import sampler_name
    from consist_jax.sampling import inputs, io
    from consist_jax.sampling.pipeline import SCDPipeline

    check_flags()
    pipe = SCDPipeline.from_checkpoint(FLAGS.checkpoint, FLAGS.step, FLAGS.use_ema)
    cli.keep_freed_memory_on_cpu()
    sampler = sampler_name(pipe.schedule, FLAGS.sampler)  # --sampler of the checkpoint's kind, before reading inputs
    context, negative_context = read_caption_contexts()
    pipe.check_context(context, negative_context)  # before the compile
    reference, ref_pose, poses = inputs.read_inputs(
        pipe.resolution, FLAGS.reference, FLAGS.poses, FLAGS.reference_pose, FLAGS.align_poses,
        FLAGS.pose_detector, FLAGS.pose_model, FLAGS.out)
    io.check_output(FLAGS.out, FLAGS.fps, "--fps", frame_size=pipe.resolution)  # before the compile
    steps, guidance = pipe.sample_settings(FLAGS.steps, FLAGS.guidance)
    frames = pipe(reference, poses, reference_pose=ref_pose, steps=steps, guidance=guidance,
                  seed=FLAGS.seed, sampler=sampler, window=FLAGS.window, overlap=FLAGS.overlap,
                  progress=True, context=context, negative_context=negative_context)
    out = io.side_by_side(reference, poses, frames) if FLAGS.side_by_side else frames
    io.write_video(FLAGS.out, out, FLAGS.fps)
    print(f"wrote {len(frames)} frames to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)

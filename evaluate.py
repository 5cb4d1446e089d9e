"""Evaluate a checkpoint on a dataset's test split, the literature's way, with baselines.

    python evaluate.py --checkpoint=runs/demo --out=outputs/demo [--videos=24 --frames=8]

For each test video: the first frame is the reference, the video's own poses are the
targets (frames ``--first_target``, then every ``--stride``-th), and the generated
frames are compared with the real ones. Baselines scored the same way:
  * ``copy_reference``: the reference frame as the prediction of every target frame;
  * ``no_reference``: the same model with the reference dropped (guidance 0 = the
    unconditional branch, which never sees the reference).
Writes ``metrics.json`` (PSNR, SSIM, L1 over the whole frame and inside the figure
mask, LPIPS/FID/FVD when their weights are given, else listed as unavailable), GIFs
of reference | pose | generated | real, and prints the comparison. For the GIF'd
videos, ``examples/{video_id}/`` keeps the inputs as sample.py reads them
(reference.png, reference_pose.png, poses/) and the generated frames as PNGs, so

    python sample.py --checkpoint=... --reference=.../reference.png \
        --reference_pose=.../reference_pose.png --poses=.../poses --out=.../resampled \
        --window=F --overlap=0 --seed=0

reproduces ``generated/`` bit for bit (both take the denoising steps and the guidance from
the run config's ``sample`` section unless ``--steps`` / ``--guidance`` say otherwise).
``examples.png`` shows the GIF'd videos as one grid (rows of people: reference | pose |
generated | real, ``--grid_frames`` frames each). With
``--curve_videos=N``, the earlier checkpoints kept in the workdir are scored on the first N
videos (same protocol, SCD only: the same compiled sampler, new weights), and the evaluated
step's score on those videos is taken from the main pass: ``metrics.json``'s ``"curve"``
(``"curve_baselines"``: the baselines on those videos) and ``metrics_curve.png``.
Flags are checked before the checkpoint loads; a user error prints one line and exits 2
(CONSIST_TRACEBACK=1 for the traceback).
"""
import os
import sys

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from consist_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A train.py workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("data_dir", None, "Dataset folder (default: the run config's).")
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_string("out", "outputs/eval", "Output folder.")
flags.DEFINE_integer("videos", 24, "Test videos to evaluate (0: all).")
flags.DEFINE_integer("frames", 8, "Target frames per video.")
flags.DEFINE_integer("first_target", 8, "First target frame.")
flags.DEFINE_integer("stride", 4, "Frame stride between targets.")
flags.DEFINE_integer("steps", None, "Denoising steps (default: the run config's sample.steps).")
flags.DEFINE_float("guidance", None, "Guidance scale (default: the run config's sample.guidance).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("gifs", 6, "Videos written as GIFs.")
flags.DEFINE_string("eval_weights", "", "Folder with LPIPS/FID/FVD weight files (safetensors).")
flags.DEFINE_bool("baselines", True, "Also score the copy-reference and no-reference baselines.")
flags.DEFINE_integer("grid_frames", 4, "Target frames per person in examples.png.")
flags.DEFINE_integer("curve_videos", 0, "Score the earlier kept checkpoints on this many videos "
                     "for the metric curve (0: no curve).")
flags.mark_flags_as_required(["checkpoint"])


def test_examples(data_dir, split, videos, frames, first, stride, resolution):
    """Yields (video id, reference frame, reference pose, target poses, real frames, masks), uint8."""
    from consist_jax.data.source import VideoRecordSource
    from consist_jax.poses.render import draw_skeletons

    source = VideoRecordSource.for_split(data_dir, split)
    count = len(source) if videos == 0 else min(videos, len(source))
    for index in range(count):
        video = source[index].decode()  # a bad record is a RecordError naming its shard
        targets = first + stride * np.arange(frames)
        if targets[-1] >= len(video.frames):
            raise ValueError(f"video {video.video_id} has {len(video.frames)} frames; the protocol needs "
                             f"frame {targets[-1]} (--first_target/--stride/--frames)")
        h, w = video.frames.shape[1:3]
        if (h, w) != tuple(resolution):
            raise ValueError(f"{data_dir} is {h}x{w}, the model was trained at {resolution}")
        poses = draw_skeletons(video.keypoints[targets], video.layout, h, w)
        ref_pose = draw_skeletons(video.keypoints[0], video.layout, h, w)
        masks = video.masks[targets] if video.masks is not None else np.ones((frames, h, w), np.uint8)
        yield video.video_id, video.frames[0], ref_pose, poses, video.frames[targets], masks


def check_flags() -> None:
    """The protocol's numbers and the output folder, before the checkpoint is loaded."""
    from consist_jax import checks, files

    checks.check_sample_settings("--", steps=FLAGS.steps, guidance=FLAGS.guidance, seed=FLAGS.seed)
    checks.non_negative_int("--videos", FLAGS.videos)
    checks.positive_int("--frames", FLAGS.frames)
    checks.non_negative_int("--first_target", FLAGS.first_target)
    checks.positive_int("--stride", FLAGS.stride)
    checks.non_negative_int("--gifs", FLAGS.gifs)
    checks.positive_int("--grid_frames", FLAGS.grid_frames)
    checks.non_negative_int("--curve_videos", FLAGS.curve_videos)
    if FLAGS.step is not None:
        checks.non_negative_int("--step", FLAGS.step)
    if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
        raise FileExistsError(f"--out={FLAGS.out!r} is a file; evaluate.py writes a folder")
    files.check_can_create(FLAGS.out, "--out")
    if FLAGS.eval_weights and not os.path.isdir(FLAGS.eval_weights):
        raise FileNotFoundError(f"--eval_weights={FLAGS.eval_weights!r} is not a folder")
    if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
        raise FileNotFoundError(f"--data_dir={FLAGS.data_dir!r} is not a folder")


@cli.reports_user_errors
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from tqdm import tqdm

    from consist_jax import files
    from consist_jax.eval import figures
    from consist_jax.eval.summary import EvaluationSummary
    from consist_jax.sampling import io
    from consist_jax.sampling.pipeline import SCDPipeline

    check_flags()
    pipe = SCDPipeline.from_checkpoint(FLAGS.checkpoint, FLAGS.step)
    cli.keep_freed_memory_on_cpu()
    config, step = pipe.config, pipe.step
    data_dir = FLAGS.data_dir or config["data"]["pipeline"]["data_dir"]
    steps, guidance = pipe.sample_settings(FLAGS.steps, FLAGS.guidance)
    methods = {"scd": guidance}
    if FLAGS.baselines:
        methods.update(copy_reference=None, no_reference=0.0)
    metric_names = ("L1", "PSNR", "SSIM", "LPIPS", "FID", "FVD", "FID-VID")
    summaries = {m: EvaluationSummary(FLAGS.eval_weights or None, metrics=metric_names) for m in methods}
    curve_summaries = {m: EvaluationSummary(None, metrics=POINT_METRICS) for m in methods}  # the curve's videos
    files.ensure_folder(FLAGS.out)
    context_of = caption_contexts(pipe)
    examples = list(test_examples(data_dir, FLAGS.split, FLAGS.videos, FLAGS.frames, FLAGS.first_target,
                                  FLAGS.stride, pipe.resolution))
    grid_rows = []
    for n, (video_id, reference, ref_pose, poses, real, masks) in enumerate(tqdm(examples, desc="videos")):
        outputs = {}
        for method, scale in methods.items():
            if method == "copy_reference":
                outputs[method] = np.repeat(reference[None], len(poses), axis=0)
            else:
                outputs[method] = generate(pipe, examples[n], steps, scale, context_of)
            summaries[method].add_videos(outputs[method][None] / 255.0, real[None] / 255.0, masks[None])
            if n < FLAGS.curve_videos:
                curve_summaries[method].add_videos(outputs[method][None] / 255.0, real[None] / 255.0, masks[None])
        if n < FLAGS.gifs:
            grid_rows.append((video_id, reference, poses, outputs["scd"], real))
            panel = np.concatenate([io.side_by_side(reference, poses, outputs["scd"]), real], axis=2)
            io.write_video(os.path.join(FLAGS.out, f"{video_id}.gif"), panel, fps=6)
            save_example(os.path.join(FLAGS.out, "examples", video_id), reference, ref_pose, poses,
                         outputs["scd"])
    results = {m: s.result() for m, s in summaries.items()}
    report = {"checkpoint": os.path.abspath(FLAGS.checkpoint), "step": step, "split": FLAGS.split,
              "protocol": {"videos": FLAGS.videos, "frames": FLAGS.frames, "first_target": FLAGS.first_target,
                           "stride": FLAGS.stride, "steps": steps, "guidance": guidance,
                           "seed": FLAGS.seed},
              "methods": results}
    written = [os.path.join(FLAGS.out, "metrics.json")]
    if FLAGS.curve_videos:
        report["protocol"]["curve_videos"] = min(FLAGS.curve_videos, len(examples))
        report["curve"] = metric_curve(pipe, FLAGS.checkpoint, examples[:FLAGS.curve_videos], steps, guidance,
                                       context_of, curve_summaries["scd"])
        report["curve_baselines"] = {m: point(s) for m, s in curve_summaries.items() if m != "scd"}
    files.write_json(written[0], report)
    if grid_rows:
        written.append(os.path.join(FLAGS.out, "examples.png"))
        figures.write_png(written[-1], figures.example_grid(grid_rows, FLAGS.grid_frames))
    if FLAGS.curve_videos:
        written.append(os.path.join(FLAGS.out, "metrics_curve.png"))
        figures.write_metric_curve(written[-1], report["curve"], report["curve_baselines"])
    print(comparison_table(results))
    if FLAGS.baselines:
        print(baseline_verdict(results))
    for path in written:
        print(f"wrote {path}")


POINT_METRICS = ("L1", "PSNR", "SSIM")  # with masks, their figure-region variants too


def point(summary) -> dict:
    """An EvaluationSummary's pixel metrics, e.g. {"PSNR": ..., "SSIM_masked": ...}."""
    return summary.result()["metrics"]


def caption_contexts(pipe):
    """video_id -> the pipeline's caption keywords: {"context": (L, D)} for a caption-conditioned
    model (model.context.kind "text"; each test video's caption as training read it, from the
    run config's data.pipeline text_embeddings_dir / captions / default_caption), else {}."""
    from consist_jax.models.scd import TextContext

    if not isinstance(pipe.model.context, TextContext):
        return lambda video_id: {}
    from consist_jax.data.text_embeddings import VideoCaptions

    data = pipe.config["data"]["pipeline"]
    if not data.get("text_embeddings_dir"):
        raise ValueError("this model is conditioned on a caption (model.context.kind='text') but its run config has "
                         "no data.pipeline.text_embeddings_dir to read the test videos' captions from")
    captions = VideoCaptions(data["text_embeddings_dir"], data.get("captions", ""), data.get("default_caption", ""))
    return lambda video_id: {"context": captions.context(video_id)}


def generate(pipe, example, steps, guidance, context_of):
    """The protocol's sampling of one test example: its targets as one window -> uint8 (F, H, W, 3)."""
    video_id, reference, ref_pose, poses, _, _ = example
    return pipe(reference, poses, reference_pose=ref_pose, steps=steps, guidance=guidance, seed=FLAGS.seed,
                window=pipe.model.latent_frames(len(poses)), overlap=0, **context_of(video_id))


def metric_curve(pipe, workdir, examples, steps, guidance, context_of, evaluated) -> list[dict]:
    """[{"step": s, metric: value}] for every checkpoint kept in ``workdir`` up to the evaluated
    one, on ``examples``: earlier steps are sampled here with the same compiled sampler (their
    weights swapped in), the evaluated step's point is ``evaluated`` (from the main pass). A
    damaged earlier checkpoint is named on the console and left out of the curve."""
    from tqdm import tqdm

    from consist_jax.eval.summary import EvaluationSummary
    from consist_jax.checkpoints import CheckpointDamagedError, finished_steps, restore_params

    evaluated_params, evaluated_step = pipe.params, pipe.step
    earlier = [s for s in finished_steps(os.path.join(workdir, "checkpoints")) if s < evaluated_step]
    curve = []
    try:
        for step in tqdm(earlier, desc="curve checkpoints"):
            try:
                pipe.params, _, pipe.step = restore_params(workdir, step)
            except CheckpointDamagedError as e:
                print(f"metric curve: left out step {step}: {e}", flush=True)
                continue
            summary = EvaluationSummary(None, metrics=POINT_METRICS)
            for example in examples:
                real, masks = example[4:]
                summary.add_videos(generate(pipe, example, steps, guidance, context_of)[None] / 255.0, real[None] / 255.0, masks[None])
            curve.append({"step": step, **point(summary)})
    finally:
        pipe.params, pipe.step = evaluated_params, evaluated_step
    return curve + [{"step": evaluated_step, **point(evaluated)}]


def save_example(folder, reference, reference_pose, poses, generated):
    """The inputs as sample.py reads them, and the generated frames (lossless PNGs), as one
    folder that replaces the one of an earlier evaluation (whose frames would otherwise mix
    with these when fewer are written) only once it is complete."""
    from consist_jax import files
    from consist_jax.sampling import io

    with files.atomic_folder(folder) as tmp:
        io.write_frames(tmp, reference[None], names=("reference.png",))
        io.write_frames(tmp, reference_pose[None], names=("reference_pose.png",))
        io.write_frames(os.path.join(tmp, "poses"), poses)
        io.write_frames(os.path.join(tmp, "generated"), generated)


def baseline_verdict(results):
    """Does SCD beat both baselines on figure-region PSNR and whole-frame SSIM?"""
    scd = results["scd"]["metrics"]
    lines = []
    for baseline in ("copy_reference", "no_reference"):
        other = results[baseline]["metrics"]
        wins = [scd[k] > other[k] for k in ("PSNR_masked", "SSIM")]
        lines.append(f"SCD vs {baseline}: figure PSNR {'better' if wins[0] else 'NOT better'}, "
                     f"frame SSIM {'better' if wins[1] else 'NOT better'}")
    return "\n".join(lines)


def comparison_table(results):
    keys = ("PSNR", "PSNR_masked", "SSIM", "SSIM_masked", "L1")
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, result in results.items():
        values = [result["metrics"].get(k) for k in keys]
        lines.append(f"| {method} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)

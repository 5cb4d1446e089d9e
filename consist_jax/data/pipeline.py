"""The training/evaluation input pipeline: ArrayRecord videos -> batches of clips, via grain.

    source (VideoRecordSource: one record = one video, global index)
      -> grain IndexSampler: seeded shuffle, a new order every epoch, repeat
      -> grain DataLoader: per-process shard (ShardOptions), worker processes
         -> MakeClip (grain RandomMap, seeded per sampled position): sample the clip
            and reference frame, decode only those frames, crop/resize/flip frames,
            masks and keypoints together, render the pose images from the keypoints
            at the output resolution (consist_jax.poses.render); with
            text_embeddings_dir, add the video's caption embedding
            (data/text_embeddings.py: VideoCaptions)
      -> ClipBatchIterator (this process): raise on or skip bad examples (the first
         few skips are printed, more than max_skipped_fraction of them is an error),
         stack, normalise, and carry the checkpointable state.

Batches are assembled here rather than in grain's workers so that a skipped example
is counted exactly (in this process) and the iterator state is always the state of
grain's loader at a batch boundary: get_state()/set_state() restore the exact next
batch, also in a new process.

Batch dict (B = batch_size, F = clip_length, H x W = resolution):
    reference              (B, H, W, 3)     float32 in [-1, 1]
    reference_pose         (B, H, W, 3)     float32 in [0, 1]
    target                 (B, F, H, W, 3)  float32 in [-1, 1]
    target_pose            (B, F, H, W, 3)  float32 in [0, 1]
    target_mask            (B, F, H, W, 1)  float32 in {0, 1}; all ones when the
                                            record carries no masks
    region_mask            (B, F, H, W, 1)  float32 in {0, 1}; only with
                                            with_region_mask (try-on)
    video_index            (B,)             int64, global record index in the split
    frame_indices          (B, F)           int32, the target frames in the video
    reference_frame_index  (B,)             int32
    context                (B, L, D)        float32; only with text_embeddings_dir: each
                                            video's caption embedding, zero-padded to the
                                            folder's max_length L (Wan: 512)
F = 1 gives single frames for the image stage.

Captions (text-conditioned models, model.context.kind "text"): the text encoder ran
once per caption (data/text_embeddings.py wrote text_embeddings_dir); a record's caption
id is captions[video_id] (captions: a JSON file {video_id: caption id}), else
default_caption, else (neither set) its video_id. A video without a caption id, or a
caption id not in the folder, is a bad example (raised, or skipped and counted).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import grain
import ml_collections
import numpy as np

from consist_jax.data import records
from consist_jax.data.clips import BadExample, ClipOptions, make_clip
from consist_jax.data.source import RawVideoRecord, VideoRecordSource
from consist_jax.data.text_embeddings import TextEmbeddingError, VideoCaptions

ON_BAD_EXAMPLE = ("error", "skip")
# Skips printed by name; the rest are counted (the training progress line and TensorBoard
# show the running count).
SKIPS_NAMED = 5
# max_skipped_fraction is judged only after this many examples: a few bad records among
# the first ones say little about the dataset.
MIN_EXAMPLES_FOR_FRACTION = 100


def default_config() -> ml_collections.ConfigDict:
    """Every key make_pipeline reads, with its default (clip keys from ClipOptions)."""
    clip = ClipOptions()
    return ml_collections.ConfigDict({
        "data_dir": "",
        "batch_size": 8,
        "clip_length": clip.clip_length,          # F; 1 for the image stage
        "frame_stride": clip.frame_stride,
        "reference_policy": clip.reference_policy,  # "any" | "outside" (the clip's span)
        "resolution": (clip.height, clip.width),  # (H, W) of the output (a dict may give one int)
        "crop_scale": clip.crop_scale,
        "center_crop": clip.center_crop,
        "flip_probability": clip.flip_probability,
        "pose_confidence_threshold": clip.pose_confidence_threshold,
        "pose_stroke_scale": clip.pose_stroke_scale,
        "with_region_mask": clip.with_region_mask,
        "shuffle": True,
        "num_epochs": None,              # None repeats forever
        "drop_remainder": True,          # drop a last partial batch (finite epochs only)
        "worker_count": 0,               # grain worker processes; 0 works in this process
        "worker_buffer_size": 2,         # clips each worker prepares ahead
        "read_threads": 2,               # threads reading records ahead (main process)
        "read_prefetch": 8,              # records read ahead
        "on_bad_example": "error",       # "error" | "skip"
        "max_skipped_fraction": 0.25,    # with "skip": more bad examples than this is an error
        "text_embeddings_dir": "",       # caption embeddings (text_embeddings.py); "": no context
        "captions": "",                  # JSON {video_id: caption id}; "": see default_caption
        "default_caption": "",           # caption id of videos not in captions ("" and no captions:
                                         # a video's caption id is its video_id)
    })


class BadExampleError(RuntimeError):
    """Raised (with on_bad_example="error") for a record that cannot become a clip."""


class MakeClip(grain.transforms.RandomMap):
    """grain transform: RawVideoRecord -> clip dict of uint8 arrays (plus the float32
    caption embedding "context" (L, D) with ``captions``), or a BadExample."""

    def __init__(self, options: ClipOptions, captions: VideoCaptions | None = None):
        self.options = options
        self.captions = captions

    def random_map(self, element: RawVideoRecord, rng: np.random.Generator):
        clip = make_clip(element, self.options, rng)
        if self.captions is None or isinstance(clip, BadExample):
            return clip
        video_id = records.read_header(element.data).video_id  # make_clip read it: it parses
        try:
            return {**clip, "context": self.captions.context(video_id)}
        except TextEmbeddingError as error:
            return BadExample(element.index, element.where(), video_id, str(error))


class ClipBatchIterator:
    """Batches of clips; checkpointable with get_state()/set_state().

    stats(): {"batches": batches yielded, "examples": clips yielded,
              "skipped": bad examples skipped, "last_skipped": message of the latest,
              "first_skipped": messages of the first SKIPS_NAMED}.

    With on_bad_example="skip", once MIN_EXAMPLES_FOR_FRACTION examples were read, more
    than ``max_skipped_fraction`` of them bad raises BadExampleError.
    """

    def __init__(self, loader: grain.DataLoader, *, batch_size: int, on_bad_example: str,
                 drop_remainder: bool, max_skipped_fraction: float = 0.25):
        if on_bad_example not in ON_BAD_EXAMPLE:
            raise ValueError(f"on_bad_example must be one of {ON_BAD_EXAMPLE}, got {on_bad_example!r}")
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
        self._examples = iter(loader)
        self._batch_size = batch_size
        self._on_bad_example = on_bad_example
        self._drop_remainder = drop_remainder
        self._max_skipped_fraction = max_skipped_fraction
        self._counts = {"batches": 0, "examples": 0, "skipped": 0}
        self._last_skipped = None
        self._first_skipped = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        clips = []
        while len(clips) < self._batch_size:
            try:
                clip = next(self._examples)
            except StopIteration:
                if clips and not self._drop_remainder:
                    break
                raise
            if isinstance(clip, BadExample):
                self._handle_bad(clip, pending=len(clips))
            else:
                clips.append(clip)
        self._counts["batches"] += 1
        self._counts["examples"] += len(clips)
        return collate_clips(clips)

    def _handle_bad(self, bad: BadExample, pending: int) -> None:
        """Raises, or counts and maybe prints the skip; ``pending``: clips of the batch being built."""
        if self._on_bad_example == "error":
            raise BadExampleError(bad.message())
        self._counts["skipped"] += 1
        self._last_skipped = bad.message()
        skipped = self._counts["skipped"]
        read = skipped + self._counts["examples"] + pending
        if len(self._first_skipped) < SKIPS_NAMED:
            self._first_skipped.append(bad.message())
            more = "; further skips are only counted" if skipped == SKIPS_NAMED else ""
            print(f"skipped {bad.message()} ({skipped} skipped of {read} examples read){more}", flush=True)
        if read >= MIN_EXAMPLES_FOR_FRACTION and skipped > self._max_skipped_fraction * read:
            raise BadExampleError(
                f"{skipped} of {read} examples read were bad ({skipped / read:.0%}), more than "
                f"max_skipped_fraction={self._max_skipped_fraction}; the first: {self._first_skipped}")

    def stats(self) -> dict:
        return dict(self._counts, last_skipped=self._last_skipped, first_skipped=list(self._first_skipped))

    def get_state(self) -> bytes:
        """JSON bytes: grain's loader state (at this batch boundary) plus the counters."""
        return json.dumps({
            "grain": self._examples.get_state().decode("utf-8"),
            "counts": self._counts, "last_skipped": self._last_skipped,
            "first_skipped": self._first_skipped,
        }).encode("utf-8")

    def set_state(self, state: bytes) -> None:
        state = json.loads(state.decode("utf-8") if isinstance(state, bytes) else state)
        self._examples.set_state(state["grain"].encode("utf-8"))
        self._counts = dict(state["counts"])
        self._last_skipped = state["last_skipped"]
        self._first_skipped = list(state.get("first_skipped", []))  # absent in older checkpoints


def collate_clips(clips: list[dict]) -> dict:
    """Stacks uint8 clips and normalises: frames to [-1, 1], poses and masks to [0, 1]."""
    def stacked(key):
        return np.stack([clip[key] for clip in clips])

    batch = {
        "reference": _to_signed_unit(stacked("reference")),
        "reference_pose": _to_unit(stacked("reference_pose")),
        "target": _to_signed_unit(stacked("target")),
        "target_pose": _to_unit(stacked("target_pose")),
        "target_mask": stacked("target_mask").astype(np.float32),
        "video_index": stacked("video_index").astype(np.int64),
        "frame_indices": stacked("frame_indices").astype(np.int32),
        "reference_frame_index": stacked("reference_frame_index").astype(np.int32),
    }
    if "region_mask" in clips[0]:
        batch["region_mask"] = stacked("region_mask").astype(np.float32)
    if "context" in clips[0]:
        batch["context"] = stacked("context")
    return batch


# In place after one conversion: at 512x512 these float arrays are the largest cost here.
def _to_signed_unit(images: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32)
    out *= np.float32(2 / 255)
    out -= np.float32(1)
    return out


def _to_unit(images: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32)
    out *= np.float32(1 / 255)
    return out


def clip_options(config: Mapping[str, Any]) -> ClipOptions:
    """The ClipOptions a pipeline config describes."""
    resolution = config["resolution"]
    height, width = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
    return ClipOptions(
        clip_length=int(config["clip_length"]), frame_stride=int(config["frame_stride"]),
        reference_policy=config["reference_policy"], height=int(height), width=int(width),
        crop_scale=tuple(float(s) for s in config["crop_scale"]),
        center_crop=bool(config["center_crop"]),
        flip_probability=float(config["flip_probability"]),
        pose_confidence_threshold=float(config["pose_confidence_threshold"]),
        pose_stroke_scale=float(config["pose_stroke_scale"]),
        with_region_mask=bool(config["with_region_mask"]))


def _merged_config(config) -> dict:
    merged = default_config().to_dict()
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = set(given) - set(merged)
    if unknown:
        raise ValueError(f"unknown pipeline config keys: {sorted(unknown)}")
    merged.update(given)
    return merged


def video_captions(config: Mapping[str, Any]) -> VideoCaptions | None:
    """The VideoCaptions a pipeline config names, or None without text_embeddings_dir."""
    folder, captions, default = config["text_embeddings_dir"], config["captions"], config["default_caption"]
    if not folder:
        if captions or default:
            raise ValueError("data.pipeline.captions / default_caption need data.pipeline.text_embeddings_dir "
                             "(the folder data/text_embeddings.py wrote)")
        return None
    try:
        return VideoCaptions(folder, captions, default)
    except TextEmbeddingError as error:
        raise TextEmbeddingError(f"data.pipeline.text_embeddings_dir={folder!r}, captions={captions!r}, "
                                 f"default_caption={default!r}: {error}") from None


def _process_shard(process_index: int | None, process_count: int | None) -> grain.sharding.ShardOptions:
    if process_index is None or process_count is None:
        import jax  # only when the caller leaves it to the JAX runtime

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                       drop_remainder=False)


def _allow_grain_workers_without_absl_app() -> None:
    """grain 0.2.18's worker processes read an absl flag and fail when flags were never
    parsed (a script not run by absl.app; google/grain#1355, fixed after 0.2.18).
    Marking the flags parsed keeps every flag at its default, as an unparsed run would."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(config, split: str, *, seed: int, process_index: int | None = None,
                  process_count: int | None = None) -> ClipBatchIterator:
    """An iterator of batches (see the module docstring) over `split` of config.data_dir.

    config: a dict or ConfigDict with keys from default_config() (missing keys take
    the defaults). seed: 32-bit non-negative int; it fixes the shuffle and every
    random choice, so (config, split, seed, process_index/count) fixes the stream.
    process_index/process_count default to jax.process_index()/process_count().
    Each process reads every process_count-th position of the global shuffled order;
    with a finite num_epochs, grain leaves out the last N mod process_count positions.
    """
    config = _merged_config(config)
    if int(config["worker_count"]) > 0:
        _allow_grain_workers_without_absl_app()
    source = VideoRecordSource.for_split(config["data_dir"], split)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shuffle=bool(config["shuffle"]),
        num_epochs=config["num_epochs"], seed=int(seed))
    loader = grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[MakeClip(clip_options(config), video_captions(config))],
        worker_count=int(config["worker_count"]),
        worker_buffer_size=int(config["worker_buffer_size"]),
        shard_options=_process_shard(process_index, process_count),
        read_options=grain.ReadOptions(num_threads=int(config["read_threads"]),
                                       prefetch_buffer_size=int(config["read_prefetch"])))
    return ClipBatchIterator(loader, batch_size=int(config["batch_size"]),
                             on_bad_example=config["on_bad_example"],
                             drop_remainder=bool(config["drop_remainder"]),
                             max_skipped_fraction=float(config["max_skipped_fraction"]))

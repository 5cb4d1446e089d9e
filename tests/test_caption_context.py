"""Precomputed caption embeddings as the context of a text-conditioned model (model.context.kind
"text"): the grain pipeline puts each video's stored embedding in the batch, a video without
a caption is a named bad example, a tiny DiT trains on them through train.py and sample.py
samples it with a caption id."""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from consist_jax.data import pipeline, records, text_embeddings as te
from consist_jax.data.source import VideoRecordSource
from consist_jax.factory import build_model
from consist_jax.models.scd import TextContext
from consist_jax.sampling.pipeline import SCDPipeline
from consist_jax.training.step import prepare_inputs
from tests.runs import REPO, run_env, script_cmd
from tests.test_text_embeddings import BATCH, CONFIG, MAX_LENGTH, _tokenize, encoder  # noqa: F401 (fixture)
from tests.test_wan_backbone import TINY_DIT, _wan_model_config

# "empty": the empty prompt, Wan's unconditional caption.
CAPTIONS = {"walking": "a person walks", "waving": "someone waves", "empty": "", "jumping": "a jump"}


def _video_ids(data_dir, split="train") -> list[str]:
    source = VideoRecordSource.for_split(data_dir, split)
    return [records.read_header(source[i].data).video_id for i in range(len(source))]


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, encoder):  # noqa: F811
    """A text-embeddings folder of CAPTIONS encoded by the tiny UMT5 (float16, several shards)."""
    folder = str(tmp_path_factory.mktemp("caption_embeddings"))
    te.write_text_embeddings(folder, te.compute_text_embeddings(encoder, _tokenize, CAPTIONS, BATCH), MAX_LENGTH,
                             captions_per_shard=2)
    return folder


@pytest.fixture(scope="module")
def captions_file(data_dir, tmp_path_factory):
    """{video_id: caption id} for every other train video; the rest take the default caption."""
    path = str(tmp_path_factory.mktemp("captions") / "captions.json")
    named = list(CAPTIONS)[:3]
    with open(path, "w") as f:
        json.dump({v: named[i % 3] for i, v in enumerate(_video_ids(data_dir)) if i % 2 == 0}, f)
    return path


def _pipeline(data_dir, seed=0, **changes):
    config = {**dict(data_dir=data_dir, batch_size=4, clip_length=1, resolution=(16, 16)), **changes}
    return pipeline.make_pipeline(config, "train", seed=seed, process_index=0, process_count=1)


def test_batches_carry_each_videos_stored_embedding(data_dir, embeddings, captions_file):
    video_ids = _video_ids(data_dir)
    with open(captions_file) as f:
        caption_of = json.load(f)
    table = te.TextEmbeddings(embeddings)
    iterator = _pipeline(data_dir, text_embeddings_dir=embeddings, captions=captions_file, default_caption="jumping")
    batches = [next(iterator) for _ in range(4)]  # 16 examples: every one of the 12 videos at least once
    seen = set()
    for batch in batches:
        assert batch["context"].shape == (4, MAX_LENGTH, CONFIG.d_model) and batch["context"].dtype == np.float32
        for index, context in zip(batch["video_index"], batch["context"]):
            video_id = video_ids[index]
            seen.add(caption_of.get(video_id, "jumping"))
            np.testing.assert_array_equal(context, table.lookup(caption_of.get(video_id, "jumping"))[0])
    assert seen == set(CAPTIONS)
    # The iterator state restores the exact next batch, context included.
    state = iterator.get_state()
    expected = next(iterator)
    restored = _pipeline(data_dir, text_embeddings_dir=embeddings, captions=captions_file, default_caption="jumping")
    restored.set_state(state)
    got = next(restored)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_caption_id_defaults_to_the_video_id(data_dir, rng, tmp_path):
    video_ids = _video_ids(data_dir)
    stored = {v: rng.standard_normal((int(rng.integers(1, 5)), 3)).astype(np.float32) for v in video_ids}
    te.write_text_embeddings(str(tmp_path), stored.items(), max_length=5, dtype="float32")
    batch = next(_pipeline(data_dir, text_embeddings_dir=str(tmp_path)))
    for index, context in zip(batch["video_index"], batch["context"]):
        tokens = stored[video_ids[index]]
        np.testing.assert_array_equal(context[: len(tokens)], tokens)
        np.testing.assert_array_equal(context[len(tokens):], 0.0)


def test_a_video_without_caption_is_a_named_bad_example(data_dir, embeddings, captions_file):
    iterator = _pipeline(data_dir, text_embeddings_dir=embeddings, captions=captions_file, batch_size=12,
                         shuffle=False, num_epochs=1)
    with pytest.raises(pipeline.BadExampleError) as error:
        next(iterator)
    message = str(error.value)
    assert "\n" not in message and "record 1 (" in message and f"video {_video_ids(data_dir)[1]!r}" in message
    assert f"no caption id in the captions file {captions_file!r}" in message
    skipping = _pipeline(data_dir, text_embeddings_dir=embeddings, captions=captions_file, batch_size=4,
                         shuffle=False, num_epochs=1, drop_remainder=False, on_bad_example="skip")
    videos = len(_video_ids(data_dir))
    assert sum(len(b["context"]) for b in skipping) == (videos + 1) // 2  # the even records, each once
    assert skipping.stats()["skipped"] == videos // 2 and "no caption id" in skipping.stats()["last_skipped"]
    missing = json.dumps({v: "not-stored" for v in _video_ids(data_dir)})
    path = os.path.join(os.path.dirname(captions_file), "missing.json")
    with open(path, "w") as f:
        f.write(missing)
    with pytest.raises(pipeline.BadExampleError, match=f"caption id 'not-stored' is not in the text embeddings "
                                                        f"at '{embeddings}'"):
        next(_pipeline(data_dir, text_embeddings_dir=embeddings, captions=path))


@pytest.mark.parametrize("changes, message", [
    (dict(text_embeddings_dir="", captions="c.json"), "data.pipeline.captions / default_caption need "
                                                      "data.pipeline.text_embeddings_dir"),
    (dict(text_embeddings_dir="/nowhere"), "data.pipeline.text_embeddings_dir='/nowhere'.*not a text-embeddings"),
    (dict(default_caption="absent"), "default_caption='absent': caption id 'absent' is not in the text embeddings"),
    (dict(captions="/nowhere.json"), "captions file '/nowhere.json' not found"),
])
def test_bad_caption_config_is_one_line(data_dir, embeddings, changes, message):
    changes = {"text_embeddings_dir": embeddings, **changes}
    with pytest.raises(ValueError, match=message) as error:
        _pipeline(data_dir, **changes)
    assert "\n" not in str(error.value)


def test_text_context_reads_the_batch(rng):
    config = _wan_model_config(context=dict(kind="text"))
    config.wan.update(in_channels=12, out_channels=12, text_dim=16)
    model, _, frozen = build_model(config, jax.random.key(0), init_params=False)
    assert model.context == TextContext(16) and frozen == {}
    batch = {"reference": rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32),
             "target": rng.uniform(-1, 1, (2, 1, 4, 4, 3)).astype(np.float32)}
    context = rng.standard_normal((2, 5, 16)).astype(np.float32)
    np.testing.assert_array_equal(prepare_inputs(model, frozen, {**batch, "context": context},
                                                 jax.random.key(0))["context"], context)
    with pytest.raises(ValueError, match="needs the caption embeddings in the batch as 'context': set "
                                         "data.pipeline.text_embeddings_dir"):
        prepare_inputs(model, frozen, batch, jax.random.key(0))
    with pytest.raises(ValueError, match=r"batch\['context'\] has shape \(2, 5, 8\).*\(B, L, 16\)"):
        prepare_inputs(model, frozen, {**batch, "context": jnp.zeros((2, 5, 8))}, jax.random.key(0))
    with pytest.raises(ValueError, match="not computed from the reference image"):
        model.embed_reference(frozen, batch["reference"])


@pytest.fixture(scope="module")
def text_dit_run(data_dir, embeddings, captions_file, tmp_path_factory):
    """A 2-step train.py run of the tiny DiT (tests/test_wan_backbone.py's config) on caption embeddings."""
    workdir = str(tmp_path_factory.mktemp("text_dit_run"))
    result = subprocess.run(
        script_cmd("train.py", TINY_DIT, f"--workdir={workdir}", "--config.train.num_steps=2",
                   "--config.train.global_batch_size=4", "--config.model.context.kind=text",
                   f"--config.model.wan.text_dim={CONFIG.d_model}", "--config.model.wan.num_layers=1",
                   f"--config.data.pipeline.text_embeddings_dir={embeddings}",
                   f"--config.data.pipeline.captions={captions_file}", "--config.data.pipeline.default_caption=jumping"),
        cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_text_dit_trains_and_samples_with_a_caption_id(text_dit_run, data_dir, embeddings, rng, tmp_path):
    workdir, stdout = text_dit_run
    losses = [float(line.split("loss ")[1].split()[0]) for line in stdout.splitlines() if "| loss " in line]
    assert len(losses) == 2 and np.all(np.isfinite(losses)), stdout[-2000:]
    pipe = SCDPipeline.from_checkpoint(workdir)
    assert pipe.model.context == TextContext(CONFIG.d_model)
    reference = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="conditioned on a caption .*: pass context="):
        pipe.check_context(None, None)
    with pytest.raises(ValueError, match=r"context has shape \(12, 8\); the model's caption embeddings are \(L, 16\)"):
        pipe.check_context(np.zeros((MAX_LENGTH, 8)), None)
    (tmp_path / "poses").mkdir()
    for i in range(2):
        _save(tmp_path / "poses" / f"{i:03d}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    common = [f"--checkpoint={workdir}", f"--reference={_save(tmp_path / 'ref.png', reference)}",
              f"--reference_pose={tmp_path / 'ref.png'}", f"--poses={tmp_path / 'poses'}", "--steps=2",
              "--window=2", "--overlap=0"]
    result = subprocess.run(script_cmd("sample.py", *common, f"--out={tmp_path / 'out'}",
                                       f"--caption_embeddings={embeddings}", "--caption_id=waving",
                                       "--negative_caption_id=empty"),
                            cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(tmp_path / "out")) == 2
    for flags, message in [([], "pass context="),  # both before any compile
                           (["--caption_id=waving"], "--caption_embeddings=DIR goes with --caption_id")]:
        result = subprocess.run(script_cmd("sample.py", *common, f"--out={tmp_path / 'none'}", *flags),
                                cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def test_evaluate_py_reads_each_test_videos_caption(text_dit_run, data_dir, tmp_path):
    """evaluate.py on a caption-conditioned run samples each test video with its caption, as
    training read it (the run config's captions file and default)."""
    workdir, _ = text_dit_run
    out = tmp_path / "eval"
    result = subprocess.run(script_cmd("evaluate.py", f"--checkpoint={workdir}", f"--out={out}", "--videos=1",
                                       "--frames=2", "--first_target=1", "--stride=1", "--steps=1", "--gifs=0",
                                       "--nobaselines"),
                            cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "metrics.json").is_file()


def test_the_unconditional_context_is_zeros_or_the_negative_caption(rng):
    from consist_jax.sampling.two_stage import guidance_conditions

    context, negative = (rng.standard_normal((2, 5, 16)).astype(np.float32) for _ in range(2))
    cond, uncond = guidance_conditions(context)
    np.testing.assert_array_equal(cond["context"], context)
    np.testing.assert_array_equal(uncond["context"], 0.0)  # as training drops the caption
    assert not np.any(uncond["reference_mask"]) and np.all(cond["reference_mask"])
    np.testing.assert_array_equal(guidance_conditions(context, negative)[1]["context"], negative)
    with pytest.raises(ValueError, match=r"negative context \(2, 4, 16\) must have the context's shape"):
        guidance_conditions(context, negative[:, :4])

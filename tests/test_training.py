"""Training: the loss, the step, sharding over meshes, checkpoints, resume, multi-host."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consist_jax.diffusion.kinds import schedule_from_config
from consist_jax.diffusion.schedule import NoiseSchedule
from consist_jax.factory import build_model
from consist_jax.training.state import OptimizerConfig, create_train_state, make_optimizer, trainable_labels
from consist_jax.training.step import LossConfig, conditioning_masks, make_train_step, scd_loss
from consist_jax.training.trainer import preflight

from tests.configs.tiny import get_config as tiny_config
from tests.runs import REPO, run_env, script_cmd, train_cmd


def final_params(workdir, step, which="params"):
    """The params (or ``which="ema_params"``) of checkpoint ``step`` as numpy arrays."""
    from consist_jax.checkpoints import read_state

    restored = read_state(os.path.join(workdir, "checkpoints", str(step), "state"))
    return jax.tree_util.tree_map(np.asarray, restored[which])


def assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------ the loss and the step


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config()
    model, params, frozen = build_model(config.model, jax.random.key(0))
    return config, model, params, frozen


def _latent_inputs(rng, b=4, f=1, with_region=False):
    inputs = {
        "reference_latents": jnp.asarray(rng.standard_normal((b, 8, 8, 12)), jnp.float32),
        "target_latents": jnp.asarray(rng.standard_normal((b, f, 8, 8, 12)), jnp.float32),
        "context": jnp.zeros((b, 1, 8)),
        "reference_pose": jnp.asarray(rng.uniform(size=(b, 16, 16, 3)), jnp.float32),
        "target_pose": jnp.asarray(rng.uniform(size=(b, f, 16, 16, 3)), jnp.float32),
    }
    if with_region:
        region = np.zeros((b, f, 8, 8, 1), np.float32)
        region[:, :, 2:6, 3:7] = 1.0
        inputs["region_mask"] = jnp.asarray(region)
    return inputs


def test_conditioning_drops_are_nested():
    u = jax.random.uniform(jax.random.key(3), (4096,))
    keep_ref, keep_ctx = conditioning_masks(u, LossConfig(drop_reference_prob=0.1, drop_context_prob=0.3))
    keep_ref, keep_ctx = np.asarray(keep_ref), np.asarray(keep_ctx)
    assert abs((~keep_ref).mean() - 0.1) < 0.03 and abs((~keep_ctx).mean() - 0.3) < 0.04
    assert np.all(keep_ctx <= keep_ref)  # a dropped reference always drops the context too here


def test_tryon_loss_sees_only_the_region(tiny_model, rng):
    """Outside the region mask neither the noisy input nor the loss depends on the target."""
    config, model, params, _ = tiny_model
    schedule = NoiseSchedule.from_config(config.diffusion)
    loss = LossConfig(prediction_type="sample", tryon=True, drop_reference_prob=0.0, drop_context_prob=0.0)
    inputs = _latent_inputs(rng, with_region=True)
    loss_fn = jax.jit(lambda p, x, r: scd_loss(p, model, schedule, loss, x, r)[1])
    base = loss_fn(params, inputs, jax.random.key(1))
    # Change the target outside the region and the model's own output there: the
    # region-masked loss moves only through the (unnoised) context the UNet sees.
    outside = 1.0 - inputs["region_mask"]
    changed = dict(inputs, target_latents=inputs["target_latents"] + 5.0 * outside)
    moved = loss_fn(params, changed, jax.random.key(1))
    assert np.all(np.isfinite(moved))
    inside_only = dict(inputs, target_latents=inputs["target_latents"] + 5.0 * inputs["region_mask"])
    assert np.abs(np.asarray(loss_fn(params, inside_only, jax.random.key(1)) - base)).min() > 1e-3
    # Plain mode averages over every token: the masked loss differs from it.
    plain = LossConfig(prediction_type="sample", drop_reference_prob=0.0, drop_context_prob=0.0)
    plain_loss = scd_loss(params, model, schedule, plain, inputs, jax.random.key(1))[1]
    assert not np.allclose(plain_loss, base)


def test_figure_loss_weight_counts_the_person_that_many_times(tiny_model, rng):
    """Per example, loss(w) = (w S_in + S_out) / (w N_in + N_out) over the squared errors inside
    and outside the person's cells: S_in and S_out solved from w = 1 and w = 3 predict w = 10."""
    config, model, params, _ = tiny_model
    schedule = NoiseSchedule.from_config(config.diffusion)
    inputs = _latent_inputs(rng)
    mask = (rng.uniform(size=(4, 1, 8, 8, 1)) < 0.3).astype(np.float32)
    inputs["target_mask"] = jnp.asarray(mask)

    def per_example(w):
        loss = LossConfig(prediction_type="sample", figure_loss_weight=w, drop_reference_prob=0.0,
                          drop_context_prob=0.0)
        return np.asarray(scd_loss(params, model, schedule, loss, inputs, jax.random.key(1))[1], np.float64)

    channels = inputs["target_latents"].shape[-1]
    n_in = mask.sum(axis=(1, 2, 3, 4)) * channels
    n_out = mask[0].size * channels - n_in
    sums = per_example(1.0) * (n_in + n_out)  # S_in + S_out
    s_in = (per_example(3.0) * (3 * n_in + n_out) - sums) / 2
    predicted = (10 * s_in + (sums - s_in)) / (10 * n_in + n_out)
    np.testing.assert_allclose(per_example(10.0), predicted, rtol=1e-4)
    assert np.all(s_in > 0) and np.all(sums - s_in > 0)
    del inputs["target_mask"]
    with pytest.raises(ValueError, match="figure_loss_weight=3.0 needs the batch's target_mask"):
        per_example(3.0)


def test_figure_weight_says_when_records_have_no_person_masks(rng, capsys):
    """Own videos carry no masks (target_mask all ones): the weight changes nothing, said once."""
    from consist_jax.training.trainer import check_figure_masks, train_keys

    config = tiny_config()
    config.train.figure_loss_weight = 3.0
    keys = train_keys(LossConfig.from_config(config.train))
    masked = {"target_mask": (rng.uniform(size=(2, 1, 4, 4, 1)) < 0.5).astype(np.float32)}
    masked["target_mask"][0, 0, 0, 0] = 0.0
    unmasked = {"target_mask": np.ones((2, 1, 4, 4, 1), np.float32)}
    assert check_figure_masks(masked, keys, config) and check_figure_masks(unmasked, train_keys(LossConfig()), config)
    assert capsys.readouterr().out == ""
    assert not check_figure_masks(unmasked, keys, config)
    assert "figure_loss_weight=3.0 weights nothing here" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_gradient_accumulation_matches_one_batch(tiny_model, rng, kind):
    """Two accumulated micro-batches give the one-batch loss and update (per-example draws),
    for both diffusion kinds (the flow draws are keyed by example id too)."""
    config, model, params, frozen = tiny_model
    diffusion = dict(config.diffusion, kind=kind, prediction_type="flow_prediction" if kind == "flow" else "sample")
    schedule = schedule_from_config(diffusion)
    loss = LossConfig(prediction_type=diffusion["prediction_type"])
    inputs = _latent_inputs(rng)
    results = {}
    for k in (1, 2):
        optim = OptimizerConfig.from_config(dict(config.optim, grad_accum_steps=k))
        opt = make_optimizer(optim, params)
        step = jax.jit(make_train_step(model, schedule, loss, opt, optim))
        results[k] = step(create_train_state(params, opt, ema=False), inputs, jax.random.key(5), frozen)
    np.testing.assert_allclose(float(results[2][1]["loss"]), float(results[1][1]["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(results[2][1]["grad_norm"]), float(results[1][1]["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(results[2][0].params), jax.tree_util.tree_leaves(results[1][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_parameters_do_not_move(tiny_model, rng):
    config, model, params, frozen = tiny_model
    # warmup_steps=0: a warmup's first learning rate is 0.
    optim = OptimizerConfig.from_config(dict(config.optim, trainable=(r"^pose_encoder/",), warmup_steps=0))
    opt = make_optimizer(optim, params)
    schedule = NoiseSchedule.from_config(config.diffusion)
    loss = LossConfig(prediction_type="sample")
    step = jax.jit(make_train_step(model, schedule, loss, opt, optim))
    state, _ = step(create_train_state(params, opt, ema=True), _latent_inputs(rng), jax.random.key(2), frozen)
    labels = jax.tree_util.tree_leaves(trainable_labels(params, optim.trainable))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                      jax.tree_util.tree_leaves(params))]
    # Frozen leaves stay put; the trainable zero-init output conv moves at once (the layers
    # behind it get zero gradient until it is non-zero).
    assert not any(m for m, label in zip(moved, labels) if label == "frozen")
    assert not np.array_equal(state.params["pose_encoder"]["conv_out"]["kernel"],
                              params["pose_encoder"]["conv_out"]["kernel"])
    # Adam moments exist for trainable leaves only.
    n_moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
    n_trainable = sum(x.size for x, l in zip(jax.tree_util.tree_leaves(params), labels) if l == "trainable")
    assert n_moments < 3 * n_trainable + 100


# ------------------------------------------------------------------ config errors


def test_preflight_errors_name_the_value(data_dir):
    config = tiny_config()
    with config.unlocked():
        config.mesh.shape = (3, -1)
    with pytest.raises(ValueError, match=r"mesh shape \(3, -1\) does not divide 1 devices"):
        preflight(config)
    config = tiny_config()
    config.train.global_batch_size = 6
    config.optim.grad_accum_steps = 4
    with pytest.raises(ValueError, match="grad_accum_steps=4"):
        preflight(config)
    config = tiny_config()
    config.model.pretrained_unet = "/nonexistent/unet"
    with pytest.raises(FileNotFoundError, match="model.pretrained_unet='/nonexistent/unet'"):
        preflight(config)


def test_unknown_config_key_fails_before_compiling(tmp_path, data_dir):
    result = subprocess.run(train_cmd(str(tmp_path), "--config.optim.not_a_key=1"), cwd=REPO,
                            env=run_env(data_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "not_a_key" in result.stderr


# ------------------------------------------------------------------ sharding

MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from tests.configs.tiny import get_config
from consist_jax.factory import build_model
from consist_jax.training import sharding
from consist_jax.training.state import OptimizerConfig, create_train_state, make_optimizer
from consist_jax.training.step import LossConfig, make_train_step
from consist_jax.diffusion.schedule import NoiseSchedule

config = get_config()
# One UNet level keeps the four SPMD compiles short; sharding rules are what is tested.
config.model.unet.update(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                         up_block_types=("CrossAttnUpBlock2D",), attention_heads=(2,),
                         transformer_layers_per_block=(1,))
model, params, frozen = build_model(config.model, jax.random.key(0))
optim = OptimizerConfig.from_config(config.optim)
opt = make_optimizer(optim, params)
step = make_train_step(model, NoiseSchedule.from_config(config.diffusion), LossConfig.from_config(
    dict(config.train, prediction_type=config.diffusion.prediction_type)), opt, optim)
rng = np.random.default_rng(int(sys.argv[2]))
batch = {"reference": rng.uniform(-1, 1, (8, 16, 16, 3)), "reference_pose": rng.uniform(0, 1, (8, 16, 16, 3)),
         "target": rng.uniform(-1, 1, (8, 1, 16, 16, 3)), "target_pose": rng.uniform(0, 1, (8, 1, 16, 16, 3)),
         "target_mask": rng.uniform(0, 1, (8, 1, 16, 16, 1)) < 0.3}  # the demo's loss weights the person
batch = {k: v.astype(np.float32) for k, v in batch.items()}
accumulating = OptimizerConfig.from_config(dict(config.optim, grad_accum_steps=2))


config.model.unet.attention_impl = "xla_chunked"  # its backward's scan, under shard_map too
chunked_model = build_model(config.model, jax.random.key(0))[0]


def flat_step(mesh, optim=optim, model=model):  # mesh.flat_gradients: each shard's gradients, one all-reduce
    return make_train_step(model, NoiseSchedule.from_config(config.diffusion), LossConfig.from_config(
        dict(config.train, prediction_type=config.diffusion.prediction_type)), opt, optim,
        (mesh, sharding.data_axes(mesh)))


out = {}
# (mesh shape, devices, step): the flat runs use 8 and 4 data shards (2 micro-batches of 4).
runs = [((8, 1), 8, None), ((4, 2), 8, None), ((1, 8), 8, None), ((1, 1), 1, None), ((8, 1), 8, flat_step),
        ((4, 1), 4, lambda mesh: flat_step(mesh, accumulating, chunked_model))]
for shape, count, make_step in runs:
    mesh = sharding.make_mesh(("data", "fsdp"), shape, jax.devices()[:count])
    state = create_train_state(params, opt, ema=False)
    state_sh = sharding.param_shardings(state, mesh, "fsdp", min_size=64)
    if shape == (1, 8):
        try:
            sharding.check_flat_gradients(mesh, state_sh.params)
        except ValueError as e:
            out["refused"] = str(e)
    fn = jax.jit(make_step(mesh) if make_step else step,
                 in_shardings=(state_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh),
                               sharding.replicated(mesh)), out_shardings=(state_sh, sharding.replicated(mesh)))
    new_state, metrics = fn(jax.device_put(state, state_sh), batch, jax.random.key(1), frozen)
    sharded = sum(1 for s in jax.tree_util.tree_leaves(state_sh) if "fsdp" in str(s.spec))
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(new_state.params)]
    out[("flat " if make_step else "") + str(shape)] = {"loss": float(metrics["loss"]), "sharded_leaves": sharded,
                       "params": [x.ravel()[:50].tolist() for x in leaves],
                       "norms": [float(np.linalg.norm(x)) for x in leaves]}
print("RESULT" + json.dumps(out))
"""


def test_one_step_is_the_same_on_every_mesh(tmp_path, rng):
    """Replicated, data-parallel, FSDP and flat-gradient (mesh.flat_gradients; with accumulation
    and the chunked attention too) steps against one device's; the flat reduction refuses split
    parameters."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    seed = str(int(rng.integers(2**31)))
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, REPO, seed], env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    single = out["(1, 1)"]
    assert out["(1, 8)"]["sharded_leaves"] > 0 and out["(8, 1)"]["sharded_leaves"] == 0
    assert out["refused"].startswith("mesh.flat_gradients needs replicated parameters, but "), out["refused"]
    for shape in ["(8, 1)", "(4, 2)", "(1, 8)", "flat (8, 1)", "flat (4, 1)"]:
        np.testing.assert_allclose(out[shape]["loss"], single["loss"], rtol=1e-5)
        np.testing.assert_allclose(out[shape]["norms"], single["norms"], rtol=1e-5)
        for a, b in zip(out[shape]["params"], single["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ checkpoints and resume


def _wait_for_checkpoint(workdir, step, proc, timeout=900):
    path = os.path.join(workdir, "checkpoints", str(step))
    start = time.time()
    while not os.path.isdir(path):
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            raise AssertionError(f"no checkpoint {step} after {timeout} s")
        time.sleep(0.2)


def test_killed_run_resumes_exactly(uninterrupted_run, data_dir, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(train_cmd(workdir), cwd=REPO, env=run_env(data_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(workdir, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = subprocess.run(train_cmd(workdir), cwd=REPO, env=run_env(data_dir), capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step" in result.stdout
    assert_trees_equal(final_params(workdir, 8), final_params(uninterrupted_run, 8))
    assert_trees_equal(final_params(workdir, 8, "ema_params"), final_params(uninterrupted_run, 8, "ema_params"))


def test_sigterm_saves_before_exiting(data_dir, tmp_path):
    """Also on a CPU host split into 2 devices (mesh.cpu_devices) with the demo's one
    all-reduce a step (mesh.flat_gradients): the batch over both."""
    workdir = str(tmp_path / "preempted")
    proc = subprocess.Popen(train_cmd(workdir, "--config.train.num_steps=100000",
                                      "--config.checkpoint.every_steps=1000", "--config.mesh.cpu_devices=2",
                                      "--config.mesh.flat_gradients=True"),
                            cwd=REPO, env=run_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 900
    line, lines = "", []
    while "step 3/" not in line:  # training is under way
        line = proc.stdout.readline()
        lines.append(line)
        assert line or proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    out = "".join(lines) + out
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved a checkpoint" in out
    assert "mesh {'data': 2, 'fsdp': 1} over 2 cpu device(s)" in out, out[:2000]
    listing = os.listdir(os.path.join(workdir, "checkpoints"))
    steps = [int(s) for s in listing if s.isdigit()]
    assert steps and max(steps) >= 3, (listing, out[-2000:], err[-2000:])


def test_non_finite_loss_stops_and_names_the_step(data_dir, tmp_path):
    workdir = str(tmp_path / "diverged")
    result = subprocess.run(train_cmd(workdir, "--config.optim.lr=1e30", "--config.optim.warmup_steps=0",
                                      "--config.optim.clip_norm=0"),
                            cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=1200)
    assert result.returncode != 0
    assert "NonFiniteLossError" in result.stderr and "at step" in result.stderr


# ------------------------------------------------------------------ multi-host


def test_two_processes_match_one(data_dir, tmp_path):
    """The same 3 steps as 2 CPU processes (gloo) and as 1 process give equal losses."""
    import portpicker

    common = ["--config.train.num_steps=3", "--config.checkpoint.every_steps=0", "--config.data.pipeline.shuffle=False"]
    single = subprocess.run(train_cmd(str(tmp_path / "one"), *common), cwd=REPO, env=run_env(data_dir),
                            capture_output=True, text=True, timeout=1200)
    assert single.returncode == 0, single.stderr[-3000:]
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(train_cmd(str(tmp_path / "two"), *common, f"--coordinator_address=127.0.0.1:{port}",
                                   "--num_processes=2", f"--process_id={i}"),
                         cwd=REPO, env=run_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    def losses(text):
        return [float(l.split("loss ")[1].split(" ")[0]) for l in text.splitlines() if l.startswith("step ")]

    np.testing.assert_allclose(losses(outs[0][0]), losses(single.stdout), rtol=1e-5)


def test_init_from_refuses_leaves_the_image_run_lacks(uninterrupted_run):
    """A model with leaves outside the motion modules that the checkpoint lacks (here the
    cross-attention the tiny image run was trained without) is refused in one line naming
    them: those leaves would otherwise stay random, and frozen in the video stage."""
    from consist_jax.factory import build_model
    from consist_jax.training.checkpoint import init_from_checkpoint

    config = tiny_config().model
    config.unet.cross_attention = True
    _, params, _ = build_model(config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"missing outside the motion modules, e\.g\. \[.*attn2") as error:
        init_from_checkpoint(params, uninterrupted_run)
    assert "\n" not in str(error.value)


def test_video_stage_trains_only_motion_modules_from_the_image_run(uninterrupted_run, data_dir, tmp_path):
    """configs/demo_video.py's path: spatial weights from the image run's checkpoint, frozen;
    the fresh motion modules (zero output) are all that moves. On 2 CPU devices: the
    restored weights are laid over the mesh (they come back on one device)."""
    from flax import traverse_util

    from consist_jax.convert.motion import is_motion_path

    workdir = str(tmp_path / "video")
    result = subprocess.run(
        script_cmd("train.py", "--config=tests/configs/tiny_video.py", f"--workdir={workdir}",
                   f"--config.model.init_from={uninterrupted_run}", "--config.mesh.cpu_devices=2"),
        cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from {uninterrupted_run} step 8" in result.stdout
    image = traverse_util.flatten_dict(final_params(uninterrupted_run, 8, "ema_params"))  # init_from takes the EMA
    video = traverse_util.flatten_dict(final_params(workdir, 2))
    motion = [p for p in video if is_motion_path(p)]
    assert motion and set(video) - set(motion) == set(image)
    for path, value in image.items():
        np.testing.assert_array_equal(video[path], value, err_msg="/".join(path))
    assert any(np.abs(video[p]).max() > 0 for p in motion if p[-2] == "proj_out")  # trained off zero

"""Defaults shared by every run config; each config file overrides what differs."""
import ml_collections

from consist_jax.data.pipeline import default_config as pipeline_defaults


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.resume = True  # continue from the workdir's latest checkpoint when there is one

    c.data = ml_collections.ConfigDict()
    c.data.synthetic = None  # a dict of SyntheticConfig fields + generate=True to build on first use
    # Every key of the grain pipeline (so each can be overridden from the command line).
    c.data.pipeline = pipeline_defaults()
    c.data.pipeline.update(
        dict(
            data_dir="",
            clip_length=1,  # F target frames; 1 for the image stage
            frame_stride=1,
            reference_policy="any",
            resolution=(512, 512),
            crop_scale=(0.8, 1.0),
            center_crop=False,
            flip_probability=0.5,
            with_region_mask=False,
            worker_count=0,
            on_bad_example="error",
        )
    )

    c.model = ml_collections.ConfigDict()
    c.model.pretrained_unet = ""
    c.model.unet = ml_collections.ConfigDict(
        dict(
            attention_rule="causal",
            attention_impl="xla",
            reference_pose_injection=True,
            pose_block_out_channels=(16, 32, 64, 128),
            remat=False,
            dtype="float32",
        )
    )
    # The video model (configs/sd15_video.py): AnimateDiff motion modules on the target frames.
    c.model.motion = ml_collections.ConfigDict(
        dict(
            enabled=False,
            num_attention_heads=8,
            transformer_layers_per_block=1,
            mid_block_transformer_layers=1,
            use_mid_block=True,
            max_seq_length=32,
            norm_num_groups=32,
            # A mesh axis (or axes) the frames are split over, e.g. "frames" with mesh axes
            # ("data", "fsdp", "frames"); None keeps each clip's frames on one device.
            frames_axis=None,
        )
    )
    c.model.motion_adapter = ""  # AnimateDiff motion modules to start from (folder or .safetensors)
    c.model.init_from = ""  # a train.py workdir whose params start this run (image stage -> video stage)
    c.model.codec = ml_collections.ConfigDict(dict(kind="vae", vae_path="", factor=8, chunk_size=8))
    c.model.context = ml_collections.ConfigDict(dict(kind="embedding", image_encoder_path=""))

    c.diffusion = ml_collections.ConfigDict(
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            rescale_zero_terminal_snr=False,
            prediction_type="epsilon",
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            global_batch_size=64,
            num_steps=30_000,
            reference_timestep=0,
            drop_reference_prob=0.1,
            drop_context_prob=0.1,
            min_snr_gamma=0.0,
            noise_offset=0.0,
            tryon=False,
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-5,
            warmup_steps=500,
            schedule="constant",  # or "cosine" (to decay_steps)
            decay_steps=30_000,
            final_lr_fraction=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            clip_norm=1.0,
            grad_accum_steps=1,
            ema_decay=0.0,  # > 0 keeps an EMA of the params
            trainable=(".*",),  # regexes over param paths ("down_blocks.0/resnets.1/conv1/kernel")
        )
    )

    # shape: within a slice (ICI); dcn_shape: slices per axis (DCN), e.g. (2, 1) for data
    # parallelism over 2 slices; param_rules: ordered (path regex, spec) pairs, e.g.
    # ((r"motion_modules", "fsdp"), (r".*", "replicated")); empty: param_sharding for all.
    c.mesh = ml_collections.ConfigDict(
        dict(axes=("data", "fsdp"), shape=(-1, 1), dcn_shape=(1, 1), param_sharding="fsdp",
             fsdp_min_size=2**14, param_rules=())
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    # profile_steps: 0-based steps traced with jax.profiler into {workdir}/tensorboard, e.g. (10, 12)
    c.log = ml_collections.ConfigDict(dict(every_steps=50, peak_tflops_per_device=0.0, profile_steps=()))

    c.sample = ml_collections.ConfigDict(
        dict(sampler="ddim", steps=25, guidance=3.5, guidance_rescale=0.0, timestep_spacing="",
             window=24, overlap=4, use_ema=True)
    )
    return c

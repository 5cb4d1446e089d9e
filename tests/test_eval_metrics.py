"""Pixel metrics against scikit-image, the Fréchet distance against scipy's sqrtm formula,
the streaming accumulators against whole-array numpy, and the resizes against PyTorch."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from consist_jax.eval import i3d, inception, metrics, resize, resnet3d, summary, weights
from parity import relative_error

TOL = 1e-5


def noisy_pair(rng, shape, data_range=1.0, noise=0.1):
    x = rng.random(shape) * data_range
    y = np.clip(x + noise * data_range * rng.standard_normal(shape), 0.0, data_range)
    return x.astype(np.float32), y.astype(np.float32)


def skimage_ssim(x, y, data_range, **kwargs):
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return structural_similarity(x64, y64, data_range=data_range, channel_axis=-1, **kwargs)


WANG = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_psnr_l1_match_skimage(rng, data_range):
    x, y = noisy_pair(rng, (2, 3, 29, 37, 3), data_range)  # (B, F, H, W, C): any leading axes
    ours_ssim = np.asarray(metrics.ssim(x, y, data_range=data_range))
    ours_psnr = np.asarray(metrics.psnr(x, y, data_range=data_range))
    ours_l1 = np.asarray(metrics.l1(x, y))
    assert ours_ssim.shape == ours_psnr.shape == ours_l1.shape == (2, 3)
    for b in range(2):
        for f in range(3):
            ref = skimage_ssim(x[b, f], y[b, f], data_range, **WANG)
            assert abs(ours_ssim[b, f] - ref) <= TOL, (ours_ssim[b, f], ref)
            ref_psnr = peak_signal_noise_ratio(x[b, f].astype(np.float64), y[b, f].astype(np.float64),
                                               data_range=data_range)
            assert abs(ours_psnr[b, f] - ref_psnr) <= TOL * abs(ref_psnr)
            ref_l1 = np.abs(x[b, f].astype(np.float64) - y[b, f]).mean()
            assert abs(ours_l1[b, f] - ref_l1) <= TOL * ref_l1


def test_uniform_window_ssim_matches_skimage_default(rng):
    """skimage's default SSIM (7x7 mean window, sample covariance): what DisCo calls, on gray."""
    x, y = noisy_pair(rng, (2, 24, 31, 1), noise=0.2)
    ours = np.asarray(metrics.ssim(x, y, window="uniform", use_sample_covariance=True))
    for i in range(2):
        ref = structural_similarity(x[i, ..., 0].astype(np.float64), y[i, ..., 0].astype(np.float64),
                                    data_range=1.0)
        assert abs(ours[i] - ref) <= TOL


def test_masked_metrics(rng):
    x, y = noisy_pair(rng, (3, 26, 30, 3))
    mask = (rng.random((3, 26, 30)) < 0.4).astype(np.float32)
    mask[2] = 0.0  # empty mask -> nan
    pad = 5  # the Gaussian window's radius: SSIM exists on the valid interior only
    m_l1 = np.asarray(metrics.masked_l1(x, y, mask))
    m_psnr = np.asarray(metrics.masked_psnr(x, y, mask[..., None]))
    m_ssim = np.asarray(metrics.masked_ssim(x, y, mask))
    for i in range(2):
        sel = mask[i] > 0
        diff = x[i].astype(np.float64)[sel] - y[i][sel]
        assert abs(m_l1[i] - np.abs(diff).mean()) <= TOL
        ref_psnr = 10 * np.log10(1.0 / np.square(diff).mean())
        assert abs(m_psnr[i] - ref_psnr) <= TOL * ref_psnr
        _, full = skimage_ssim(x[i], y[i], 1.0, full=True, **WANG)
        interior = (slice(pad, -pad), slice(pad, -pad))
        ref_ssim = full.mean(axis=-1)[interior][sel[interior]].mean()
        assert abs(m_ssim[i] - ref_ssim) <= TOL
    assert np.isnan(m_l1[2]) and np.isnan(m_psnr[2]) and np.isnan(m_ssim[2])
    ones = np.ones((3, 26, 30), np.float32)  # a full mask is the unmasked metric
    np.testing.assert_allclose(metrics.masked_ssim(x, y, ones), metrics.ssim(x, y), atol=1e-6)
    np.testing.assert_allclose(metrics.masked_psnr(x, y, ones), metrics.psnr(x, y), rtol=1e-6)


def test_streaming_mean_skips_nan():
    acc = metrics.StreamingMean()
    acc.update(np.array([1.0, 2.0])).update(np.array([[3.0, np.nan]]))
    assert acc.mean == pytest.approx(2.0) and acc.count == 3 and acc.skipped == 1
    assert np.isnan(metrics.StreamingMean().mean)


def test_frechet_stats_stream_and_merge(rng):
    feats = rng.standard_normal((230, 16)) * rng.random(16) * 3 + 50.0  # large mean: cancellation
    a, b = metrics.FrechetStats(), metrics.FrechetStats()
    for chunk in np.array_split(feats[:100], 3):
        a.update(chunk)
    b.update(feats[100:])
    np.testing.assert_allclose(a.mean, feats[:100].mean(0), rtol=1e-12)
    a.merge(b)
    assert a.count == 230
    np.testing.assert_allclose(a.mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.covariance, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-10)


def scipy_frechet(mu1, s1, mu2, s2):
    """The pytorch-fid / DisCo formula with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_scipy_sqrtm(rng):
    d = 48
    f1 = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) * 0.3
    f2 = rng.standard_normal((350, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.2
    s1 = metrics.FrechetStats().update(f1)
    s2 = metrics.FrechetStats().update(f2)
    ours = metrics.frechet_distance_from_stats(s1, s2)
    ref = scipy_frechet(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert relative_error(ours, ref) <= TOL
    self_distance = metrics.frechet_distance(s1.mean, s1.covariance, s1.mean, s1.covariance)
    # Zero up to rounding: square roots of near-zero eigenvalues amplify eps to ~sqrt(eps).
    assert abs(self_distance) <= 1e-6 * np.trace(s1.covariance)


def test_frechet_reference_roundtrip(tmp_path, rng):
    stats = metrics.FrechetStats().update(rng.standard_normal((20, 5)))
    stats.save(tmp_path / "gt.npz")
    mu, sigma = metrics.load_frechet_reference(tmp_path / "gt.npz")
    np.testing.assert_allclose(mu, stats.mean)
    np.testing.assert_allclose(sigma, stats.covariance)


@pytest.mark.parametrize("src,dst", [((40, 52), (299, 299)), ((333, 300), (299, 299)), ((256, 192), (112, 112))])
def test_resizes_match_torch(rng, src, dst):
    x = rng.random((2, *src, 3), dtype=np.float32)
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    ref = F.interpolate(t, size=dst, mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    assert relative_error(resize.resize_bilinear(x, dst), ref) <= 1e-6
    ref = F.interpolate(t, size=dst, mode="bicubic", align_corners=False, antialias=True)
    assert relative_error(resize.resize_bicubic_antialiased(x, dst), ref.numpy().transpose(0, 2, 3, 1)) <= 2e-5


def test_video_clips_repeat_last_frame(rng):
    videos = rng.random((2, 21, 4, 4, 3), dtype=np.float32)
    clips = np.asarray(resnet3d.video_clips(videos, 16))
    assert clips.shape == (2, 2, 16, 4, 4, 3)
    np.testing.assert_array_equal(clips[:, 0], videos[:, :16])
    np.testing.assert_array_equal(clips[:, 1, :5], videos[:, 16:])
    np.testing.assert_array_equal(clips[:, 1, 5:], np.repeat(videos[:, -1:], 11, axis=1))


def test_summary_without_weights_reports_unavailable(rng, tmp_path):
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"never read")
    paths = {"i3d": str(tmp_path / "elsewhere" / "i3d.safetensors")}
    suite = summary.EvaluationSummary(str(tmp_path), weight_paths=paths)
    x, y = noisy_pair(rng, (2, 3, 32, 32, 3))
    mask = rng.random((2, 3, 32, 32)) < 0.5
    suite.add_videos(x[:1], y[:1], mask[:1])
    suite.add_videos(x[1:], y[1:], mask[1:])
    out = json.loads(json.dumps(suite.result()))
    flat_x, flat_y = x.reshape(-1, 32, 32, 3), y.reshape(-1, 32, 32, 3)
    assert out["metrics"]["PSNR"] == pytest.approx(float(np.mean(metrics.psnr(flat_x, flat_y))), rel=1e-6)
    assert out["metrics"]["SSIM"] == pytest.approx(float(np.mean(metrics.ssim(flat_x, flat_y))), rel=1e-6)
    assert {"L1", "L1_masked", "PSNR_masked", "SSIM_masked"} <= set(out["metrics"])
    assert set(out["unavailable"]) == {"LPIPS", "FID", "FID-VID", "FVD"}
    assert "found" in out["unavailable"]["FID"] and "6726825d.pth" in out["unavailable"]["FID"]
    assert "alexnet-owt-7be5be79.safetensors" in out["unavailable"]["LPIPS"]
    assert "elsewhere" in out["unavailable"]["FVD"]
    assert out["counts"] == {"frames": 6, "videos": 2, "masked_frames": 6, "empty_masks": {}}


def test_disco_protocol(rng):
    suite = summary.EvaluationSummary(protocol=summary.DISCO, metrics=("L1", "PSNR", "SSIM"))
    x, y = noisy_pair(rng, (2, 24, 20, 3))
    suite.add_frames(x, y)
    out = suite.result()
    xq, yq = (np.round(v * 255) for v in (x, y))
    assert out["metrics"]["L1-DisCo"] == pytest.approx(np.abs(xq - yq).mean() / (24 * 20), rel=1e-5)
    a, b = xq.astype(np.uint8), yq.astype(np.uint8)  # DisCo's psnr_eval on cv2's uint8 images
    ref_psnr = np.mean([20 * np.log10(255.0 / np.sqrt(np.mean((a[i] - b[i]) ** 2))) for i in range(2)])
    assert out["metrics"]["PSNR-DisCo"] == pytest.approx(ref_psnr, rel=1e-5)
    assert out["metrics"]["PSNR-DisCo"] > out["metrics"]["PSNR"] + 5  # the wraparound inflates it
    gray = lambda v: np.round(v @ np.array([0.299, 0.587, 0.114]))
    ref = np.mean([structural_similarity(gray(xq[i]), gray(yq[i]), data_range=255.0) for i in range(2)])
    # Luma values are multiples of 0.001: a few land on .5, where float32 and float64 round
    # differently (cv2's fixed point differs there too), moving SSIM by ~1e-5.
    assert out["metrics"]["SSIM"] == pytest.approx(ref, abs=1e-4)
    assert out["unavailable"] == {} and out["protocol"]["name"] == "disco"


def test_check_available_messages(tmp_path):
    with pytest.raises(weights.WeightsUnavailable, match="i3d_pretrained_400"):
        weights.check_available("i3d", None)
    with pytest.raises(ValueError, match="pickled"):
        weights.check_available("i3d", str(tmp_path / "i3d_pretrained_400.pt"))
    status = weights.availability(str(tmp_path))
    assert set(status) == set(weights.METRIC_WEIGHTS) and all(v != "available" for v in status.values())


class TinyFeatures(nn.Module):
    """A stand-in feature network: spatio-temporal mean -> Dense(4). Any (B, ..., 3) -> (B, 4)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(jnp.tanh(x).mean(axis=tuple(range(1, x.ndim - 1))))


def test_summary_set_metrics_stream(monkeypatch, rng):
    """FID / FID-VID / FVD plumbing: preprocessing, per-video clip averaging, streaming stats."""
    nets = {}
    for name, dummy in (("fid", (1, 8, 8, 3)), ("i3d", (1, 2, 8, 8, 3)), ("r3d", (1, 2, 8, 8, 3))):
        module = TinyFeatures()
        nets[name] = (module, module.init(jax.random.PRNGKey(len(nets)), jnp.zeros(dummy))["params"])
    monkeypatch.setattr(weights, "load_fid_inception", lambda *a: nets["fid"])
    monkeypatch.setattr(weights, "load_i3d", lambda *a: nets["i3d"])
    monkeypatch.setattr(weights, "load_resnet3d", lambda *a: nets["r3d"])
    suite = summary.EvaluationSummary(metrics=("FID", "FID-VID", "FVD"))
    generated, truth = noisy_pair(rng, (4, 18, 12, 10, 3), noise=0.3)  # 18 frames: 2 clips of 16
    for lo in (0, 2):
        suite.add_videos(generated[lo : lo + 2], truth[lo : lo + 2])
    out = suite.result()

    def fd(a, b):
        return scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    def feats(name, preprocess, videos):
        module, params = nets[name]
        run = jax.jit(lambda v: module.apply({"params": params}, preprocess(v)))
        return np.asarray(run(videos), np.float64)

    def fid_input(v):
        return inception.fid_preprocess(v.reshape(-1, *v.shape[2:]))

    def clips(v):  # DisCo: pad 18 frames to 32 with the last one, two clips of 16
        prepared = resnet3d.fid_vid_preprocess(v)
        padded = jnp.concatenate([prepared, jnp.repeat(prepared[:, -1:], 14, axis=1)], axis=1)
        return padded.reshape(8, 16, 112, 112, 3)

    expected = {
        "FID": fd(*(feats("fid", fid_input, v) for v in (generated, truth))),
        "FVD": fd(*(feats("i3d", i3d.fvd_preprocess, v) for v in (generated, truth))),
        "FID-VID": fd(*(feats("r3d", clips, v).reshape(4, 2, 4).mean(axis=1) for v in (generated, truth))),
    }
    for name, value in expected.items():
        assert out["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-7), name
    assert out["counts"]["videos"] == 4 and out["counts"]["frames"] == 72

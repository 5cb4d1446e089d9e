"""LPIPS (AlexNet / VGG16 + v0.1 heads) against a PyTorch reference of the same network,
with small random weights saved as safetensors under the published key names."""
import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from consist_jax.convert.loading import CheckpointError
from consist_jax.eval import lpips, summary, weights
from parity import relative_error

TOL = 1e-4
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def torch_alexnet_features():
    """torchvision's AlexNet ``features`` layout; taps after the ReLUs at 1, 4, 7, 9, 11."""
    layers = [
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    ]
    return nn.Sequential(*layers), (1, 4, 7, 9, 11)


def torch_vgg16_features():
    """torchvision's VGG16 ``features`` layout; taps relu1_2 .. relu5_3."""
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers), (3, 8, 15, 22, 29)


class TorchBackbone(nn.Module):
    """features + a stand-in ``classifier`` (the published file has one; LPIPS ignores it)."""

    def __init__(self, net):
        super().__init__()
        self.features, self.taps = torch_alexnet_features() if net == "alex" else torch_vgg16_features()
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4, 3))

    def forward(self, x):
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
            if i == self.taps[-1]:
                return outs


class TorchLin(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))


class TorchHeads(nn.Module):
    def __init__(self, net):
        super().__init__()
        for i, c in enumerate(lpips.CHANNELS[net]):
            setattr(self, f"lin{i}", TorchLin(c))
            with torch.no_grad():  # lpips' heads are non-negative
                getattr(self, f"lin{i}").model[1].weight.uniform_(0.0, 0.2)


def torch_lpips(backbone, heads, x, y):
    """The lpips v0.1 formula (inputs in [-1, 1], NCHW) -> (N,), plus the taps of x."""
    fx, fy = backbone((x - SHIFT) / SCALE), backbone((y - SHIFT) / SCALE)
    total = 0
    for i, (a, b) in enumerate(zip(fx, fy)):
        a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        total = total + getattr(heads, f"lin{i}").model((a - b) ** 2).mean(dim=(2, 3))
    return total[:, 0], fx


def save_lpips_files(tmp_path, net, seed, heads_prefix="lin"):
    torch.manual_seed(seed)
    backbone, heads = TorchBackbone(net).eval(), TorchHeads(net).eval()
    paths = {"alex": ("alexnet", "lpips_alex"), "vgg": ("vgg16", "lpips_vgg")}[net]
    save_file(backbone.state_dict(), str(tmp_path / weights.WEIGHT_FILES[paths[0]].filename))
    head_state = {k.replace("lin", heads_prefix, 1): v for k, v in heads.state_dict().items()}
    save_file(head_state, str(tmp_path / weights.WEIGHT_FILES[paths[1]].filename))
    return backbone, heads


@pytest.mark.parametrize("net,size", [("alex", 64), ("vgg", 32)])
def test_lpips_matches_torch(tmp_path, rng, net, size):
    backbone, heads = save_lpips_files(tmp_path, net, int(rng.integers(2**31)))
    module, params = weights.load_lpips(net, str(tmp_path))
    x = rng.random((2, size, size, 3), dtype=np.float32)
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) * 2 - 1
    with torch.no_grad():
        ref, ref_taps = torch_lpips(backbone, heads, to_t(x), to_t(y))
    # Jitted: one compilation is cheaper on CPU than dispatching every op eagerly.
    ours = jax.jit(lambda p, a, b: lpips.lpips_distance(module, p, a, b, normalize=True))(params, x, y)
    err = relative_error(ours, ref.numpy())
    print(f"LPIPS-{net} distance relative error {err:.2e}")
    assert err <= TOL
    taps = jax.jit(lambda p, a: module.apply({"params": p}, module.scale_inputs(2 * a - 1),
                                             method=lpips.LPIPS.features))(params, x)
    for ours_tap, ref_tap in zip(taps, ref_taps):
        assert relative_error(ours_tap, ref_tap.numpy().transpose(0, 2, 3, 1)) <= TOL


def test_lpips_loader_renames_and_accounts_for_keys(tmp_path, rng):
    save_lpips_files(tmp_path, "alex", int(rng.integers(2**31)), heads_prefix="lins.")
    weights.load_lpips("alex", str(tmp_path))  # ModuleList-style names map through the rule
    state = {"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}  # four heads missing
    save_file(state, str(tmp_path / "lpips_alex.safetensors"))
    with pytest.raises(CheckpointError, match="4 missing"):
        weights.load_lpips("alex", str(tmp_path))


def test_summary_streams_lpips(tmp_path, rng):
    backbone, heads = save_lpips_files(tmp_path, "alex", int(rng.integers(2**31)))
    x = rng.random((4, 64, 64, 3), dtype=np.float32)
    y = rng.random((4, 64, 64, 3), dtype=np.float32)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) * 2 - 1
    with torch.no_grad():
        ref = torch_lpips(backbone, heads, to_t(x), to_t(y))[0].mean().item()
    suite = summary.EvaluationSummary(str(tmp_path), metrics=("LPIPS",))
    suite.add_frames(x[:2], y[:2])
    suite.add_frames(x[2:], y[2:])
    out = suite.result()
    assert out["metrics"]["LPIPS"] == pytest.approx(ref, rel=TOL)
    assert out["unavailable"] == {} and out["counts"]["frames"] == 4

"""FID Inception-v3, I3D and the 3D ResNet-50 against PyTorch references of the same
architectures (written here from the published layouts; random weights with BatchNorm
statistics), saved
as safetensors under the published key names and read through our loader."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from consist_jax.eval import i3d, inception, resnet3d, weights
from parity import relative_error

TOL = 1e-4


def seeded(rng):
    seed = int(rng.integers(2**31))
    torch.manual_seed(seed)
    return seed


@torch.no_grad()
def randomize(model):
    """He-normal conv weights (activations keep their scale through the depth without a
    calibration pass) and random BatchNorm statistics and affines; eval mode."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.7, 1.3)
            m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


# --------------------------------------------------------------------------- FID Inception


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg3(x))], 1)


class BlockB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg3(x))], 1)


class BlockD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid's network: torchvision Inception3 names, FID blocks, pool3 output."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, "avg"), BlockE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # in the published file; unused for pool3

    def forward(self, x):
        """x (N, 3, H, W) in [0, 1], as pytorch-fid's InceptionV3([3]) takes it."""
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(self, name)(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def test_fid_inception_matches_torch(tmp_path, rng):
    seeded(rng)
    model = randomize(TorchFIDInception())
    path = tmp_path / weights.WEIGHT_FILES["fid_inception"].filename
    save_file(model.state_dict(), str(path))  # includes fc and num_batches_tracked
    module, params = weights.load_fid_inception(str(tmp_path))
    images = rng.random((1, 83, 67, 3), dtype=np.float32)  # any size: resized to 299
    with torch.no_grad():
        ref = model(nchw(images)).numpy()
    ours = jax.jit(lambda p, x: inception.fid_features(module, p, x))(params, images)
    err = relative_error(ours, ref)
    print(f"FID Inception pool3 relative error {err:.2e}")
    assert ours.shape == (1, inception.FEATURE_DIM) and err <= TOL


# --------------------------------------------------------------------------- I3D


def tf_same_pad(x, kernel, stride):
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads.append((total // 2, total - total // 2))
    (t0, t1), (h0, h1), (w0, w1) = pads
    return F.pad(x, (w0, w1, h0, h1, t0, t1))


class Unit3D(nn.Module):
    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True, bias=False, relu=True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride=stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=0.001, momentum=0.01) if bn else None

    def forward(self, x):
        x = self.conv3d(tf_same_pad(x, self.kernel, self.stride))
        x = self.bn(x) if self.bn is not None else x
        return F.relu(x) if self.relu else x


def same_max_pool3d(x, kernel, stride):
    return F.max_pool3d(tf_same_pad(x, kernel, stride), kernel, stride)  # zero padding


class Mixed(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3b = Unit3D(cin, c[5])

    def forward(self, x):
        b3 = self.b3b(same_max_pool3d(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], 1)


class TorchI3D(nn.Module):
    """The InceptionI3d layout of i3d_pretrained_400.pt; returns (logits, 1024-d features)."""

    def __init__(self):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        cin = 192
        for name, c in i3d.MIXED.items():
            setattr(self, name, Mixed(cin, c))
            cin = c[0] + c[2] + c[4] + c[5]
        self.logits = Unit3D(1024, 400, bn=False, bias=True, relu=False)

    def forward(self, x):
        x = same_max_pool3d(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
        x = same_max_pool3d(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)), (1, 3, 3), (1, 2, 2))
        for name in i3d.MIXED:
            if name == "Mixed_4b":
                x = same_max_pool3d(x, (3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                x = same_max_pool3d(x, (2, 2, 2), (2, 2, 2))
            x = getattr(self, name)(x)
        pooled = F.avg_pool3d(x, (1, 7, 7), stride=1)
        logits = self.logits(pooled).squeeze(3).squeeze(3).mean(2)
        return logits, pooled.flatten(2).mean(2)


def test_i3d_matches_torch(tmp_path, rng):
    seeded(rng)
    model = randomize(TorchI3D())
    state = model.state_dict()
    save_file(state, str(tmp_path / weights.WEIGHT_FILES["i3d"].filename))
    module, params = weights.load_i3d(str(tmp_path))
    video = rng.uniform(-1, 1, (1, 3, 224, 224, 3)).astype(np.float32)  # odd T: uneven SAME pads
    with torch.no_grad():
        ref_logits, ref_feats = model(torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))))
    logits, feats = jax.jit(lambda p, v: module.apply({"params": p}, v, output="both"))(params, video)
    err_logits, err_feats = relative_error(logits, ref_logits.numpy()), relative_error(feats, ref_feats.numpy())
    print(f"I3D logits relative error {err_logits:.2e}, features {err_feats:.2e}")
    assert logits.shape == (1, 400) and feats.shape == (1, 1024)
    assert err_logits <= TOL and err_feats <= TOL


def test_fvd_preprocess_matches_disco(rng):
    video = rng.random((1, 2, 96, 80, 3), dtype=np.float32)
    frames = torch.from_numpy(video[0].transpose(0, 3, 1, 2)) * 255
    ref = F.interpolate(frames, size=(224, 224), mode="bicubic", antialias=True) / 127.5 - 1
    ours = i3d.fvd_preprocess(video)[0]
    assert relative_error(ours, ref.numpy().transpose(0, 2, 3, 1)) <= 1e-5


# --------------------------------------------------------------------------- 3D ResNet-50


class TorchBottleneck(nn.Module):
    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = nn.Sequential(
            nn.Conv3d(cin, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm3d(planes * 4)
        ) if downsample else None

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (self.downsample(x) if self.downsample is not None else x))


class TorchResNet3D50(nn.Module):
    """Hara et al.'s ResNet (Bottleneck, [3, 4, 6, 3], shortcut B, last_fc=False)."""

    def __init__(self, sample_size, sample_duration):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, 7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        cin = 64
        for i, (planes, blocks, stride) in enumerate(resnet3d.STAGES, start=1):
            layer = []
            for b in range(blocks):
                s = stride if b == 0 else 1
                layer.append(TorchBottleneck(cin, planes, s, downsample=b == 0))
                cin = planes * 4
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.pool_window = (-(-sample_duration // 16), -(-sample_size // 32), -(-sample_size // 32))
        self.fc = nn.Linear(2048, 400)  # in the published file; unused with last_fc=False

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return F.avg_pool3d(x, self.pool_window, stride=1).flatten(1)


def test_resnet3d_matches_torch(tmp_path, rng):
    seeded(rng)
    model = randomize(TorchResNet3D50(sample_size=64, sample_duration=8))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel names
    save_file(state, str(tmp_path / weights.WEIGHT_FILES["resnet3d"].filename))
    module, params = weights.load_resnet3d(str(tmp_path))
    clips = rng.standard_normal((1, 8, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3)))).numpy()
    ours = jax.jit(lambda p, v: module.apply({"params": p}, v))(params, clips)
    err = relative_error(ours, ref)
    print(f"3D ResNet-50 features relative error {err:.2e}")
    assert ours.shape == (1, resnet3d.FEATURE_DIM) and err <= TOL


def test_resnet3d_disco_clip_shape_and_preprocess(rng):
    out = jax.eval_shape(resnet3d.ResNet3D50().init_with_output, jax.random.PRNGKey(0),
                         jnp.zeros((2, 16, 112, 112, 3)))[0]
    assert out.shape == (2, 2048)
    frames = rng.random((3, 90, 120, 3), dtype=np.float32)
    ref = F.interpolate(nchw(frames) * 255, size=(112, 112), mode="bicubic", antialias=True)
    ref = ref - torch.tensor(resnet3d.KINETICS_MEAN).view(1, 3, 1, 1)
    assert relative_error(resnet3d.fid_vid_preprocess(frames), ref.numpy().transpose(0, 2, 3, 1)) <= 1e-5

"""The web page (python -m consist_jax.app) end to end in headless Chromium: upload a
reference photo, its pose and a poses file, set the numbers, click Generate, and the PNG
frames the page offers equal sample.py's frames for the same inputs bit for bit (the MP4s
are H.264, which is lossy: checked for their frame count and size only). The page fetches
nothing from outside 127.0.0.1.

Chromium is Debian's (scripts/test.sh installs it), driven by playwright; ``playwright
install`` (a CDN download) is never needed. CONSIST_CHROMIUM names another binary.
"""
import io as stdlib_io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from urllib.parse import urlsplit

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from consist_jax.poses import example_pose
from consist_jax.poses.io import save_poses
from consist_jax.poses.keypoints import PoseSequence
from tests.runs import REPO, run_env, script_cmd

FRAMES = 2
SERVER_START_S = 120  # the checkpoint load on a busy 2-core machine
GENERATE_S = 300  # the first request compiles


@pytest.fixture(scope="session")  # session: set up before the tiny run (session-scoped) is trained
def chromium() -> str:
    """The browser's path."""
    path = os.environ.get("CONSIST_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run `bash scripts/test.sh` (it apt-installs Debian's chromium) "
                    "or `apt-get install -y chromium`, or set CONSIST_CHROMIUM", pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_inputs(rng, folder):
    """A random 16x16 reference, its pose and FRAMES jittered target poses (keypoint files
    on the reference's canvas)."""
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "reference.png")
    pose = example_pose("openpose18", 16, 16)
    jitter = lambda n: np.concatenate([rng.normal(0, 0.4, (n, len(pose), 2)), np.zeros((n, len(pose), 1))], -1)
    save_poses(folder / "reference_pose.npz", PoseSequence(pose + jitter(1), "openpose18", 16, 16))
    save_poses(folder / "poses.npz", PoseSequence(pose + jitter(FRAMES), "openpose18", 16, 16))
    return {name: str(folder / name) for name in ("reference.png", "reference_pose.npz", "poses.npz")}


def _write_example(files, align, folder):
    """The same inputs as sample.py reads them, saved as an example folder (evaluate.py's
    layout: reference.png, reference_pose.png, poses/): what the page's example picker offers."""
    from consist_jax.sampling import inputs, io

    reference, ref_pose, poses = inputs.read_inputs((16, 16), files["reference.png"], files["poses.npz"],
                                                    files["reference_pose.npz"], align)
    io.write_frames(str(folder), np.stack([reference, ref_pose]), names=("reference.png", "reference_pose.png"))
    io.write_frames(str(folder / "poses"), poses)


def _wait_for_server(server, url):
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the app exited with code {server.returncode}:\n{server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"the app did not answer on {url} within {SERVER_START_S} s")


def _upload(page, elem_id, path, shown):
    """Uploads ``path``; returns once the component shows ``shown`` (the upload finished)."""
    page.locator(f"#{elem_id} input[type=file]").set_input_files(path)
    page.locator(f"#{elem_id} {shown}").first.wait_for()


def _fill(page, elem_id, value):
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.blur()


def _download(page, name, folder):
    with page.expect_download() as download:
        page.locator(f"#downloads a[download='{name}']").click()
    folder.mkdir(exist_ok=True)
    path = str(folder / name)
    download.value.save_as(path)
    return path


_WATCH_FOR_TEXT = """text => {
    window.__textSeen = false;
    new MutationObserver(() => {
        if (document.body.innerText.includes(text)) window.__textSeen = true;
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def _generate_from_uploads(page, files, settings, folder):
    """A refusal first (nothing uploaded), then uploads, numbers, Generate, the progress bar:
    the downloaded (PNG frames zip, result MP4)."""
    page.locator("#generate").click()  # a user error: one line on the page
    page.get_by_text("reference: upload a photo of the person, or pick an example").wait_for()
    _upload(page, "reference", files["reference.png"], "img")
    _upload(page, "reference_pose", files["reference_pose.npz"], "a[download='reference_pose.npz']")
    _upload(page, "poses", files["poses.npz"], "a[download='poses.npz']")
    for name in ("steps", "guidance", "seed"):
        _fill(page, name, settings[name])
    page.locator("#align").get_by_label(settings["align_poses"], exact=True).check()
    page.get_by_text("Advanced").click()
    _fill(page, "window", settings["window"])
    _fill(page, "overlap", settings["overlap"])
    # The progress bar shows while the steps run, which may be a moment after a long compile:
    # a DOM observer records whether its text ever appeared, instead of racing to see it.
    page.evaluate(_WATCH_FOR_TEXT, f"{settings['steps']} steps x 1 window(s)")
    page.locator("#generate").click()
    page.locator("#downloads a[download='result_frames.zip']").wait_for(timeout=GENERATE_S * 1000)
    assert page.evaluate("window.__textSeen"), "no progress bar was shown while generating"
    assert page.locator("#video video").get_attribute("src")
    return _download(page, "result_frames.zip", folder), _download(page, "result.mp4", folder)


def _generate_from_example(page, name, folder):
    """Picks example ``name`` (pose images: no alignment), Generate again: the new PNG frames zip."""
    from playwright.sync_api import expect

    page.locator("#example input").click()
    page.get_by_role("option", name=name).click()
    page.locator("#align").get_by_label("off", exact=True).check()
    link = page.locator("#downloads a[download='result_frames.zip']")
    first_href = link.get_attribute("href")
    page.locator("#generate").click()
    expect(link).not_to_have_attribute("href", first_href, timeout=GENERATE_S * 1000)
    return _download(page, "result_frames.zip", folder)


def test_page_generates_what_sample_py_generates(chromium, uninterrupted_run, data_dir, rng, tmp_path):
    from playwright.sync_api import sync_playwright

    files = _write_inputs(rng, tmp_path)
    settings = dict(steps=2, guidance=round(float(rng.uniform(1.0, 4.0)), 2), seed=int(rng.integers(0, 1000)),
                    align_poses=str(rng.choice(["off", "global", "per_limb"])), window=FRAMES, overlap=0)
    sampled = tmp_path / "sampled"
    # sample.py and the app's checkpoint load run side by side (both compile the same program).
    sample_py = subprocess.Popen(
        script_cmd("sample.py", f"--checkpoint={uninterrupted_run}", f"--reference={files['reference.png']}",
                   f"--reference_pose={files['reference_pose.npz']}", f"--poses={files['poses.npz']}",
                   f"--out={sampled}", *(f"--{k}={v}" for k, v in settings.items())),
        cwd=REPO, env=run_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _write_example(files, settings["align_poses"], tmp_path / "examples" / "person")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "consist_jax.app", f"--checkpoint={uninterrupted_run}",
                               f"--port={port}", f"--examples={tmp_path / 'examples'}"],
                              cwd=tmp_path, env=run_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    url = f"http://127.0.0.1:{port}/"
    outside = []
    try:
        _wait_for_server(server, url)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(accept_downloads=True)

            def only_local(route):
                if urlsplit(route.request.url).hostname not in ("127.0.0.1", "localhost"):
                    outside.append(route.request.url)
                    return route.abort()
                return route.continue_()

            page.route("**/*", only_local)
            page.goto(url)
            archive, video = _generate_from_uploads(page, files, settings, tmp_path / "uploads")
            example_archive = _generate_from_example(page, "person", tmp_path / "example")
            browser.close()
        assert sample_py.wait(timeout=GENERATE_S) == 0, sample_py.stdout.read()[-3000:]
    finally:
        for process in (server, sample_py):
            if process.poll() is None:
                process.kill()
                process.wait()
        print(f"the app's output:\n{server.stdout.read()[-5000:]}")  # shown when the test fails
    assert outside == [], f"the page fetched from outside 127.0.0.1: {outside}"
    expected = sorted(os.listdir(sampled))
    for path in (archive, example_archive):
        with zipfile.ZipFile(path) as zf:
            assert sorted(zf.namelist()) == expected and len(expected) == FRAMES
            for name in expected:
                np.testing.assert_array_equal(np.asarray(Image.open(stdlib_io.BytesIO(zf.read(name)))),
                                              np.asarray(Image.open(sampled / name)), err_msg=f"{path}: {name}")
    assert iio.imread(video).shape == (FRAMES, 16, 16, 3)


def test_app_refuses_bad_flags_in_one_line(tmp_path, capsys):
    """Before the checkpoint loads (nothing here is a checkpoint): exit 2 and one line."""
    from consist_jax import app

    examples = tmp_path / "examples"
    examples.mkdir()
    cases = {"--port=70000": "--port", f"--examples={tmp_path / 'missing'}": "missing': not a folder",
             f"--examples={examples}": "holds no example folder", "--pose_model=m.onnx": "both --pose_detector",
             "--step=-1": "--step"}
    for flag, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            app.main([f"--checkpoint={tmp_path}", flag])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], (flag, lines)


def test_uploaded_pose_files(tmp_path):
    """One video or keypoints file is used as it is; several files become a folder (by name,
    as sample.py reads one); an example folder gives evaluate.py's three inputs."""
    from consist_jax import app

    uploads = []
    for i, name in enumerate(["b/001.png", "a/000.png"]):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_bytes(bytes([i]))
        uploads.append(str(tmp_path / name))
    assert app.poses_path([str(tmp_path / "dance.MP4")], str(tmp_path)) == str(tmp_path / "dance.MP4")
    folder = app.poses_path(uploads, str(tmp_path / "request"))
    assert sorted(os.listdir(folder)) == ["000.png", "001.png"]
    with pytest.raises(ValueError, match="two uploaded files are named '000.png'"):
        app.poses_path([uploads[1], uploads[1]], str(tmp_path / "request2"))
    with pytest.raises(ValueError, match="poses: upload"):
        app.poses_path([], str(tmp_path))
    example = tmp_path / "examples" / "video_0"
    (example / "poses").mkdir(parents=True)
    (example / "reference.png").write_bytes(b"")
    assert app.example_folders(str(tmp_path / "examples")) == {"video_0": str(example)}
    assert app.example_paths(str(example)) == (str(example / "reference.png"), None, str(example / "poses"))


def test_outputs_are_whole_or_absent(rng, tmp_path, monkeypatch):
    """The page's files go through files.py's verified writes: the ZIP reads back; a disk that
    takes no more is a WriteError naming the file (one line on the page), and nothing partial
    is left; an upload that cannot be copied is one too."""
    from consist_jax import app, files

    frames = rng.integers(0, 256, (FRAMES, 16, 16, 3), dtype=np.uint8)
    _, (_, archive) = app.write_outputs(str(tmp_path / "ok"), frames[0], frames, frames, 12.0)
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == ["000.png", "001.png"] and zf.comment == b"ok"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "write", full_disk)
    with pytest.raises(files.WriteError, match=r"cannot write '.*failed/result_frames.zip': No space left"):
        app.write_outputs(str(tmp_path / "failed"), frames[0], frames, frames, 12.0)
    assert sorted(os.listdir(tmp_path / "failed")) == ["frames", "result.mp4", "side_by_side.mp4"]
    monkeypatch.setattr(shutil, "copyfile", full_disk)
    uploads = [str(tmp_path / "ok" / "frames" / name) for name in ("000.png", "001.png")]
    with pytest.raises(files.WriteError, match=r"cannot copy the upload '.*000.png' to .*: No space left"):
        app.poses_path(uploads, str(tmp_path / "request"))


def test_requests_are_refused_before_sampling(rng, tmp_path):
    """A missing reference, an unwritable setting or an emptied number field: a user error
    (shown on the page in one line) before the pipeline is called."""
    from consist_jax import app

    class NoSampling:
        resolution = (16, 16)

        def __call__(self, *args, **kwargs):
            raise AssertionError("the refusal came after sampling")

    files = _write_inputs(rng, tmp_path)
    generator = app.Generator(NoSampling(), str(tmp_path), examples={})
    with pytest.raises(ValueError, match="reference: upload a photo"):
        generator.generate(None, None, [files["poses.npz"]], app.UPLOAD, app.Settings())
    with pytest.raises(ValueError, match="frames per second"):
        generator.generate(files["reference.png"], files["reference_pose.npz"], [files["poses.npz"]], None,
                           app.Settings(fps=0.0))
    with pytest.raises(ValueError, match="seed: enter a number"):
        app._number("seed", None, int)

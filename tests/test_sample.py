"""sample.py on the CPU, offline, with tiny models: the grid and the .npz, resume, per-sample noise in closed form, the
release's layout, the VAE, refused folders, files and flags, labels, TF32 off.

Closed forms come from an untrained model: adaLN-Zero starts at v = 0, so the Euler sampler returns its start noise
unchanged (image and token), and each sample must be exactly its own generator's draw, whatever the batching."""

import argparse
import copy
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub

import numpy as np
import pytest
import torch
from PIL import Image

import reg
import sample
from tests.conftest import label_width

GENERATE = sample.generate  # the real one, while a stand-in is patched in

DEVICE = os.environ.get("REG_TEST_DEVICE", "cpu")  # pytest --device cuda


def tiny(method="reg", seed=0, perturb=True, **overrides):
    """A tiny model on 8x8 RGB, 4 classes, a 64-d token. perturb: adaLN-Zero starts at v = 0; perturb the zeroed
    layers so that samples depend on the weights."""
    torch.manual_seed(seed)
    settings = dict(input_size=8, in_channels=3, num_classes=4, encoder_dim=64) | overrides
    model = reg.make_model("SiT-Ti/2", method=method, **settings)
    for name, p in model.named_parameters():
        if perturb and ("adaLN" in name or "final_layer" in name):
            torch.nn.init.normal_(p, std=0.05)
    return model


def save_run(folder, model):
    """A training checkpoint NNNNNNN.pt as train_*.py writes it (model, EMA, optimiser, ...)."""
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    reg.save_training_state(str(folder), 7, model, copy.deepcopy(model), opt, scaler, dict(step=7))
    return folder / "0000007.pt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("run"), tiny())


def run(ckpt, out, *flags):
    """sample.py with 3 steps, batches of 3, on the CPU; out None: the default output folder."""
    where = [] if out is None else ["--out", str(out)]
    argv = [str(ckpt), *where, "--sample-steps", "3", "--batch-size", "3", "--device", DEVICE, *map(str, flags)]
    return sample.main(sample.parse_args(argv))


def npz(result, key="arr_0"):
    return np.load(result["path"])[key]


def start_noise(seed, i, shape, width):
    """Sample i's start image and token, as the docstring promises: its own generator, seeded by (seed, i)."""
    generator = torch.Generator().manual_seed(int(reg.fingerprint(seed, i), 16))
    return torch.randn(shape, generator=generator), torch.randn(width, generator=generator)


def tiles(path, rows, per_row, side, names=("0",)):
    """The grid's tiles (rows, per_row, side, side, 3) as reg.save_grid lays them out: enlarged by a whole factor to at
    least 64 px (nearest neighbour: every zoom-th pixel is the tile), 4 px apart, below the title, right of the names
    (their width in the 12 px font, 8 px of margin)."""
    grid = np.asarray(Image.open(path))
    zoom = max(1, 64 // side)
    step = side * zoom + 4
    top = grid.shape[0] - rows * step
    left = label_width(*names)
    cells = [
        [grid[top + r * step :: zoom, left + c * step :: zoom][:side, :side] for c in range(per_row)]
        for r in range(rows)
    ]
    return np.array(cells)


def levels(x):
    """Closed form of the 8 bits: 255 (x + 1) / 2 clipped and rounded."""
    return np.round(np.clip(255.0 * ((x + 1) / 2.0), 0, 255)).astype(np.uint8)


def test_grid_and_npz_shapes_and_arrangement(ckpt, tmp_path, capsys):
    g = run(ckpt, tmp_path / "grid", "--labels", 0, 1, 2, 3, "--per-row", 2, "--batch-size", 2)
    grid = tiles(g["path"], 4, 2, 8)
    assert g["samples"] == 8
    assert f"wrote {g['path']}: 8 samples in" in capsys.readouterr().out  # the closing line
    assert os.listdir(tmp_path / "grid") == ["grid.png"]  # no settings.json, no shards
    r = run(ckpt, tmp_path / "npz", "--npz", "--num-samples", 7, "--shard-size", 3)
    x = npz(r)
    assert r["path"].endswith("samples_7.npz") and x.shape == (7, 8, 8, 3) and x.dtype == np.uint8
    assert x.std() > 5 and not (x[0] == x[1]).all()
    # sample i has label i % 4 in both, so grid cell (row i % 4, column i // 4) is npz sample i: the same noise (start
    # and SDE) though the grid ran in batches of 2 and the npz in shards of 3
    for i in range(7):
        np.testing.assert_array_equal(grid[i % 4, i // 4], x[i])
    assert "shard 3/3" in capsys.readouterr().out
    again = run(ckpt, tmp_path / "npz", "--npz", "--num-samples", 7, "--shard-size", 3)
    assert np.array_equal(npz(again), x) and "shard" not in capsys.readouterr().out  # made none


def test_noise_is_per_sample_in_closed_form_and_the_seed_picks_it(tmp_path):
    """An untrained model with Euler returns its start noise, so sample i must be uint8(its own draw), whatever the
    batch; a seed reproduces its samples, another seed gives others."""
    path = reg.save_model(str(tmp_path / "zero.pt"), tiny(perturb=False))
    flags = ["--npz", "--num-samples", 5, "--sampler", "euler", "--seed", 3]
    a = npz(run(path, tmp_path / "a", *flags, "--batch-size", 2))
    b = npz(run(path, tmp_path / "b", *flags, "--batch-size", 5, "--shard-size", 2))
    other = npz(run(path, tmp_path / "o", *flags[:-1], 4))
    starts = torch.stack([start_noise(3, i, (3, 8, 8), 64)[0] for i in range(5)]).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(a, levels(starts)) and np.array_equal(a, b)
    assert np.abs(a.astype(int) - other).mean() > 20


class Killed(Exception):
    pass


class Interrupt:
    """Stands in for sample.generate: lets `shards` calls through, then stops the run as a kill would."""

    def __init__(self, shards):
        self.shards = shards
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls > self.shards:
            raise Killed
        return GENERATE(*args)


def test_an_interrupted_run_resumes_to_the_same_file_at_another_batch_size(ckpt, tmp_path, monkeypatch):
    flags = ["--npz", "--num-samples", 8, "--shard-size", 3]
    full = npz(run(ckpt, tmp_path / "full", *flags))  # batches of 3
    monkeypatch.setattr(sample, "generate", Interrupt(1))
    with pytest.raises(Killed):
        run(ckpt, tmp_path / "out", *flags, "--batch-size", 2)
    assert sorted(os.listdir(tmp_path / "out")) == ["settings.json", "shard-0000000-0000003.npz"]
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert "batch_size" not in settings and re.fullmatch("[0-9a-f]{16}", settings["weights"])
    resume = Interrupt(8)
    monkeypatch.setattr(sample, "generate", resume)
    resumed = run(ckpt, tmp_path / "out", *flags, "--batch-size", 1)
    assert resume.calls == 2  # the finished shard is not redone
    assert np.array_equal(npz(resumed), full)  # one CPU thread (conftest): exact
    assert sorted(os.listdir(tmp_path / "out")) == ["samples_8.npz", "settings.json"]  # shards merged, removed
    resume.calls = 0
    assert npz(run(ckpt, tmp_path / "out", *flags)).shape == (8, 8, 8, 3) and resume.calls == 0  # nothing to do


def release_name(key):
    """Our name of a parameter -> the release's (reg.OFFICIAL_NAMES read backwards)."""
    for old, new in reg.OFFICIAL_NAMES.items():
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def test_the_releases_layout_and_a_bare_state_dict_load(ckpt, tmp_path):
    ours = npz(run(ckpt, tmp_path / "ours", "--npz", "--num-samples", 4))
    state = reg.load_checkpoint(str(ckpt))
    official = {release_name(k): v for k, v in state["ema"].items()}
    assert "cls_projectors2.weight" in official and "projectors.0.0.weight" in official
    namespace = argparse.Namespace(model="SiT-Ti/2", encoder_depth=2, enc_type="dinov2-vit-b")
    torch.save(dict(model=official, ema=official, opt={}, steps=7, args=namespace), tmp_path / "release.pt")
    torch.save(state["ema"], tmp_path / "bare.pt")
    for name in ("release.pt", "bare.pt"):
        theirs = npz(run(tmp_path / name, tmp_path / name.replace(".", "-"), "--npz", "--num-samples", 4))
        assert np.array_equal(ours, theirs), name


def tiny_vae(folder):
    """The SD-VAE's architecture, narrower (8x upsampling, 4 latent channels), randomly initialised and saved to
    `folder` as diffusers saves it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(folder)
    return vae.eval()


def test_the_vae_decodes_latents(tmp_path, monkeypatch):
    """A latent model's samples go through the VAE: --vae, else the one its checkpoint names, else the paper's (ema).
    Closed form: an untrained model with Euler returns its start latents, and the grid is their decoding."""
    vae = tiny_vae(tmp_path / "vae")
    model = tiny(perturb=False, input_size=4, in_channels=4, num_classes=3)
    latent = reg.save_model(str(tmp_path / "latent.pt"), model)
    r = run(latent, tmp_path / "out", "--vae", tmp_path / "vae", "--per-row", 1, "--sampler", "euler")
    grid = tiles(r["path"], 3, 1, 32)[:, 0]  # (3, 32, 32, 3)
    starts = torch.stack([start_noise(0, i, (4, 4, 4), 64)[0] for i in range(3)])
    with torch.no_grad():
        decoded = vae.decode(starts / reg.LATENT_SCALE).sample.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(grid, levels(decoded))
    with pytest.raises(SystemExit, match="as --vae"):
        run(latent, tmp_path / "none", "--vae", tmp_path / "no-such-vae")
    state = reg.load_checkpoint(latent)
    torch.save(dict(state, vae=str(tmp_path / "vae")), tmp_path / "named.pt")  # as train_imagenet.py saves it
    named = run(tmp_path / "named.pt", tmp_path / "named", "--per-row", 1, "--sampler", "euler")
    assert np.array_equal(tiles(named["path"], 3, 1, 32)[:, 0], grid)
    asked = []
    monkeypatch.setattr(reg, "load_vae", lambda name, device: asked.append(name) or vae)
    run(tmp_path / "named.pt", tmp_path / "mse", "--per-row", 1, "--sampler", "euler", "--vae", "mse")
    run(latent, tmp_path / "ema", "--per-row", 1, "--sampler", "euler", "--npz", "--num-samples", 2)
    assert asked == ["mse", "ema"]  # the flag, else the paper's VAE
    assert json.loads((tmp_path / "ema" / "settings.json").read_text())["vae"] == "ema"


def test_a_folder_with_other_settings_or_weights_is_refused(ckpt, tmp_path):
    """settings.json records the flags samples depend on and a fingerprint of the weights, not the checkpoint's path:
    other settings, or another model at the same path, are refused; the same weights elsewhere continue."""
    flags = ["--npz", "--num-samples", 4, "--shard-size", 2]
    first = run(ckpt, tmp_path / "out", *flags)
    before = open(first["path"], "rb").read()
    with pytest.raises(SystemExit, match="other settings or weights .*sample_steps: 3 there, 4 now"):
        run(ckpt, tmp_path / "out", *flags, "--sample-steps", 4)
    with pytest.raises(SystemExit, match="labels: \\[0, 1, 2, 3\\] there, \\[1\\] now"):
        run(ckpt, tmp_path / "out", *flags, "--labels", 1)
    replaced = save_run(tmp_path / "run", tiny(seed=1))  # another model under a training checkpoint's name
    with pytest.raises(SystemExit, match="weights: [0-9a-f]{16} there, [0-9a-f]{16} now"):
        run(replaced, tmp_path / "out", *flags)
    assert open(first["path"], "rb").read() == before
    save_run(tmp_path / "run", tiny())  # the first model again, at the other path
    assert np.array_equal(npz(run(replaced, tmp_path / "out", *flags)), np.load(first["path"])["arr_0"])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ([1, 2, 3], "holds a list, not a checkpoint"),
        ({"weight": torch.zeros(2)}, "not a SiT state dict"),
        ({"ema": {"weight": torch.zeros(2)}, "step": 3}, "not a SiT state dict"),
        ({"model": {}, "step": 3}, "has no 'ema' weights"),
        (b"not a checkpoint", "no readable checkpoint"),
    ],
)
def test_files_that_hold_no_model_exit_with_a_message(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(SystemExit, match=f"^sample.py: .*{message}"):
        run(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_exits_with_a_message(ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--out .*notes.txt is a file: pass a folder"):
        run(ckpt, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_default_folder_names_the_run_and_the_checkpoint(ckpt, tmp_path, monkeypatch):
    """Every run has a 0000007.pt, so the default folder is samples/<run folder>-<checkpoint>."""
    monkeypatch.chdir(tmp_path)
    r = run(ckpt, None, "--per-row", 1)
    assert r["path"] == os.path.join("samples", f"{ckpt.parent.name}-0000007", "grid.png")


def test_tf32_is_off_while_sampling(ckpt, tmp_path):
    """Both TF32 switches are off while sampling (the release's default on GPUs is on, cuDNN's too). They are set and
    restored here, not monkeypatched: torch implements them as properties."""
    matmul = torch.backends.cuda.matmul
    before = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        run(ckpt, tmp_path / "b", "--sample-steps", 1, "--per-row", 1)
        assert not matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sample-steps", 0], "--sample-steps: '0' is not an integer >= 1"),
        (["--guidance-high", 1.5], "--guidance-high: '1.5' is not a number from 0 to 1"),
        (["--cfg-scale", "inf"], "--cfg-scale: 'inf' is not a finite number"),
        (["--cls-cfg-scale", "nan"], "--cls-cfg-scale: 'nan' is not a finite number"),
        (["--batch-size", 0], "--batch-size: '0' is not an integer >= 1"),
        (["--labels", 1, 4], "--labels must lie in 0..3"),
        (["--device", "banana"], "sample.py: Expected one of cpu, cuda"),
        (["--vae", "ema"], "sample.py: --vae decodes latents; this model makes pixels: drop --vae"),
    ],
)
def test_bad_flags_exit_with_a_message(ckpt, tmp_path, flags, message, capsys):
    with pytest.raises(
        SystemExit
    ) as stop:  # numbers fail while argparse reads them (message on stderr), the rest after
        run(ckpt, tmp_path / "out", *flags)
    assert message in str(stop.value) + capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_grid_rows_are_named_by_the_checkpoints_classes_else_by_their_labels(tmp_path, capsys):
    """The row names are drawn left of the tiles, a title above them: a grid whose checkpoint stores class names
    (train_cifar.py's args["classes"]) has a wider margin of names than one that shows label numbers, and the same
    tiles."""
    model = tiny()
    state = dict(ema=model.state_dict(), config=vars(model.cfg), args=dict(classes=["plane", "car", "bird", "cat"]))
    torch.save(state, tmp_path / "named.pt")
    named = run(tmp_path / "named.pt", tmp_path / "a", "--per-row", 1)
    plain = run(reg.save_model(str(tmp_path / "plain.pt"), model), tmp_path / "b", "--per-row", 1)
    classes = ["plane", "car", "bird", "cat"]
    assert np.array_equal(tiles(named["path"], 4, 1, 8, classes), tiles(plain["path"], 4, 1, 8))
    grid = np.asarray(Image.open(named["path"]))
    assert grid[20:, : label_width("plane")].min() < 128 and grid[:12].min() < 128  # names and a title are drawn
    title = "named.pt: sde, 3 steps, CFG scale 1.0"
    assert grid.shape[1] >= label_width(title)  # wider than a tile: the title is not cut
    assert "/2 [" in capsys.readouterr().err  # the progress bar counts 2 batches of 3


def test_samples_that_are_not_finite_are_refused_before_anything_is_written(ckpt, tmp_path):
    with pytest.raises(SystemExit, match=r"sample.py: samples that are not finite \(--cfg-scale 1e\+308\?\)"):
        run(ckpt, tmp_path / "out", "--cfg-scale", "1e308", "--labels", 0, 1)
    assert os.listdir(tmp_path / "out") == []


def test_a_full_disk_an_out_under_a_file_and_ctrl_c_end_in_one_line(ckpt, tmp_path, monkeypatch):
    flags = ["--npz", "--num-samples", 4, "--shard-size", 2]
    savez = np.savez

    def full_disk(path, **arrays):
        if "samples_4" in str(path):  # the merge: half a file, then no space left
            open(path, "wb").write(b"PK")
            raise OSError(28, "No space left on device", path)
        savez(path, **arrays)

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(SystemExit, match="sample.py: cannot write .*No space left.*free disk space"):
        run(ckpt, tmp_path / "out", *flags)
    shards = ["shard-0000000-0000002.npz", "shard-0000002-0000004.npz"]
    assert sorted(os.listdir(tmp_path / "out")) == ["samples_4.npz.tmp.npz", "settings.json", *shards]
    monkeypatch.setattr(np, "savez", savez)
    assert run(ckpt, tmp_path / "out", *flags)["samples"] == 4  # space again: the same command finishes
    assert sorted(os.listdir(tmp_path / "out")) == ["samples_4.npz", "settings.json"]  # the half file overwritten
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit, match="sample.py: cannot write .*Not a directory.*writable folder as --out"):
        run(ckpt, tmp_path / "file" / "out")

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "generate", ctrl_c)
    with pytest.raises(SystemExit, match="sample.py: stopped; the finished .npz shards are kept"):
        run(ckpt, tmp_path / "stopped", *flags)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_device_mps_without_an_apple_gpu_names_the_fix(ckpt, tmp_path):
    argv = [str(ckpt), "--out", str(tmp_path / "out"), "--device", "mps"]
    with pytest.raises(SystemExit, match="sample.py: --device mps: .* no MPS GPU: use --device cpu"):
        sample.main(sample.parse_args(argv))

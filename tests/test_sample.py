"""sample.py on CPU, offline, with tiny random models: outputs, resume, seeds, the release's layout, the VAE, metrics,
errors, export, the release's label draw and 8-bit conversion."""

import argparse
import copy
import json
import os
import re
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reg
import sample

ENC = "test_vit"  # tiny timm ViT (64-d), random weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Our checkpoint layout (reg.Run.save) of a tiny REG model on 8x8 RGB inputs, 4 classes, 64-d token."""
    torch.manual_seed(0)
    model = perturbed(reg.make_model("SiT-Ti/2", input_size=8, in_channels=3, num_classes=4, encoder_dim=64))
    ema = copy.deepcopy(model)
    folder = tmp_path_factory.mktemp("run")
    reg.Run(str(folder)).save(7, model, ema, torch.optim.AdamW(model.parameters()))
    return reg.list_checkpoints(str(folder))[-1]


def perturbed(model):
    """adaLN-Zero starts at v = 0: perturb the zero-initialised layers so that samples depend on the weights."""
    for n, p in model.named_parameters():
        if "adaLN" in n or "final_layer" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def run(ckpt, out, *flags):
    """sample.py with 3 steps, batches of 3, on the CPU; out None: the default output folder."""
    where = [] if out is None else ["--out", str(out)]
    argv = [str(ckpt), *where, "--sample-steps", "3", "--batch-size", "3", "--device", "cpu", *map(str, flags)]
    return sample.main(sample.parse_args(argv))


def npz(path):
    return np.load(path)["arr_0"]


def test_grid_and_npz_shapes_and_arrangement(ckpt, tmp_path):
    g = run(ckpt, tmp_path / "grid", "--labels", "0,1,2,3", "--per-row", 2, "--save-png")
    grid = np.asarray(Image.open(g["path"]))
    assert grid.shape == (4 * 8, 2 * 8, 3) and grid.dtype == np.uint8 and g["samples"] == 8
    r = run(ckpt, tmp_path / "npz", "--npz", "--num-samples", 7, "--shard-size", 3)  # SDE: same batch starts
    x = npz(r["path"])
    assert r["path"].endswith("samples_7.npz") and x.shape == (7, 8, 8, 3) and x.dtype == np.uint8
    assert x.std() > 5  # not a constant image
    # sample i has label i % 4 in both modes, so grid cell (row i % 4, column i // 4) is npz sample i; its noise
    # (start and SDE) depends only on (seed, i), so all 7 agree, the last one sampled in a batch of 2 in the grid
    for i in range(7):
        r_, c_ = i % 4, i // 4
        np.testing.assert_array_equal(grid[8 * r_ : 8 * r_ + 8, 8 * c_ : 8 * c_ + 8], x[i])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid" / "png" / "000005.png")), x[5])


def test_interrupted_run_resumes_to_the_same_file(ckpt, tmp_path):
    full = npz(run(ckpt, tmp_path / "a", "--npz", "--num-samples", 8, "--shard-size", 3)["path"])
    part = run(ckpt, tmp_path / "b", "--npz", "--num-samples", 8, "--shard-size", 3, "--max-shards", 1)
    assert part == dict(done=1, shards=3) and not (tmp_path / "b" / "samples_8.npz").exists()
    first = tmp_path / "b" / "shard-0000000-0000003.npz"
    stamp = first.stat().st_mtime_ns
    resumed = npz(run(ckpt, tmp_path / "b", "--npz", "--num-samples", 8, "--shard-size", 3, "--keep-shards")["path"])
    assert np.array_equal(full, resumed) and first.stat().st_mtime_ns == stamp  # finished shard not redone


def test_seeds_reproduce_and_ode_noise_is_per_sample(ckpt, tmp_path):
    a = npz(run(ckpt, tmp_path / "a", "--npz", "--num-samples", 5, "--sampler", "euler", "--seed", 1)["path"])
    b = npz(run(ckpt, tmp_path / "b", "--npz", "--num-samples", 5, "--sampler", "euler", "--seed", 1)["path"])
    c = npz(
        run(ckpt, tmp_path / "c", "--npz", "--num-samples", 5, "--sampler", "euler", "--seed", 1, "--batch-size", 2)[
            "path"
        ]
    )
    d = npz(run(ckpt, tmp_path / "d", "--npz", "--num-samples", 5, "--sampler", "euler", "--seed", 2)["path"])
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).max() <= 1  # other batching: same noise per sample
    assert np.abs(a.astype(int) - d).mean() > 5


def test_official_layout_and_bare_state_dict(ckpt, tmp_path):
    ours = npz(run(ckpt, tmp_path / "ours", "--npz", "--num-samples", 4)["path"])
    state = reg.load_checkpoint(ckpt)
    names = {"token_embedder.": "cls_projectors2.", "token_norm.": "wg_norm.", "projector.": "projectors.0."}

    def official(sd):
        for new, old in names.items():
            sd = {(old + k[len(new) :] if k.startswith(new) else k): v for k, v in sd.items()}
        return sd

    sd = official(state["ema"])
    assert "cls_projectors2.weight" in sd and "projectors.0.0.weight" in sd and "token_embedder.weight" not in sd
    release = dict(
        model=official(state["model"]),
        ema=sd,
        opt={},
        steps=7,
        args=argparse.Namespace(model="SiT-Ti/2", encoder_depth=2, enc_type="dinov2-vit-b"),
    )
    torch.save(release, tmp_path / "release.pt")
    torch.save(state["ema"], tmp_path / "bare.pt")
    theirs = npz(run(tmp_path / "release.pt", tmp_path / "theirs", "--npz", "--num-samples", 4)["path"])
    bare = npz(run(tmp_path / "bare.pt", tmp_path / "bare", "--npz", "--num-samples", 4)["path"])
    assert np.array_equal(ours, theirs) and np.array_equal(ours, bare)


def tiny_vae(folder):
    """The SD-VAE layout, narrower (8x upsampling, 4 latent channels), saved to `folder` as diffusers saves it."""
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
    return vae


def latent_checkpoint(path, **extra):
    """Our layout of a tiny latent REG model (4x4x4 latents, 3 classes), with `extra` entries (vae=...)."""
    model = reg.make_model("SiT-Ti/2", input_size=4, in_channels=4, num_classes=3, encoder_dim=64)
    reg.save_checkpoint(
        str(path),
        dict(model=model.state_dict(), ema=model.state_dict(), opt={}, step=0, config=vars(model.cfg), **extra),
    )
    return path


def test_vae_decodes_latents(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    loaded = reg.load_vae(str(tmp_path / "vae"))
    out = loaded.decode(torch.randn(2, 4, 4, 4)).sample
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    latent_checkpoint(tmp_path / "latent.pt")
    r = run(tmp_path / "latent.pt", tmp_path / "out", "--vae", tmp_path / "vae", "--per-row", 1, "--sampler", "euler")
    assert np.asarray(Image.open(r["path"])).shape == (3 * 32, 32, 3)
    with pytest.raises(SystemExit, match="as --vae"):
        run(tmp_path / "latent.pt", tmp_path / "none", "--vae", tmp_path / "no-such-vae")


def test_metrics_and_bench(ckpt, tmp_path):
    gen = run(ckpt, tmp_path / "gen", "--npz", "--num-samples", 6, "--save-png")
    other = tmp_path / "ref" / "train" / "cat"  # cifar10-train: class folders
    other.mkdir(parents=True)
    for i, a in enumerate(np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)):
        Image.fromarray(a).save(other / f"{i}.png")
    fd = ["--fd-encoder", ENC, "--fd-encoder-weights", "random", "--npz", "--num-samples", 6]
    same = run(ckpt, tmp_path / "gen", *fd, "--fd-ref", tmp_path / "gen" / "png", "--save-png")
    assert abs(same["fd"]) < 1e-4  # identical image sets
    diff = run(
        ckpt, tmp_path / "gen", *fd, "--fd-ref", "cifar10-train", "--data-dir", tmp_path / "ref" / "train", "--save-png"
    )
    assert diff["fd"] > 0.1 and len(list((tmp_path / "gen").glob("fd-ref-*.pt"))) == 2
    tok = run(ckpt, tmp_path / "tok", "--encoder", ENC, "--encoder-weights", "random", "--npz", "--num-samples", 4)
    assert -1 <= tok["token_consistency"] <= 1 and gen["samples"] == 6
    b = run(
        ckpt,
        tmp_path / "bench",
        "--bench",
        1,
        "--sampler",
        "euler",
        "--sample-steps",
        4,
        "--cfg-scale",
        2,
        "--guidance-high",
        0.5,
    )
    assert b["nfe_per_sample"] == 6 and b["samples_per_s"] > 0  # t = 1, .75 once; t = .5, .25 twice
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sample-steps", 0], "--sample-steps: '0' is not an integer >= 1"),
        (["--guidance-low", 0.6, "--guidance-high", 0.5], "--guidance-low <= --guidance-high"),
        (["--guidance-high", 1.5], "--guidance-high: '1.5' is not a number from 0 to 1"),
        (["--labels", "1,4"], "--labels"),
        (["--encoder-depth", 9], "encoder_depth"),
        (["--weights", "model", "--batch-size", 0], "--batch-size: '0' is not an integer >= 1"),
        (["--bench", -1], "--bench: '-1' is not an integer >= 0"),
        (["--labels-random"], "--labels-random is for --npz"),
        (["--vae", "ema"], "drop --vae"),
    ],
)
def test_bad_flags_exit_with_a_message(ckpt, tmp_path, flags, message, capsys):
    with pytest.raises(
        SystemExit
    ) as stop:  # numbers fail while argparse reads them (message on stderr), the rest after
        run(ckpt, tmp_path / "out", *flags)
    assert message in str(stop.value) + capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_folder_with_other_settings_is_refused(ckpt, tmp_path):
    g = run(ckpt, tmp_path / "out", "--per-row", 1)
    before = open(g["path"], "rb").read()
    with pytest.raises(SystemExit, match="other settings.*steps"):
        run(ckpt, tmp_path / "out", "--per-row", 1, "--sample-steps", 4)
    assert open(g["path"], "rb").read() == before
    plain = reg.make_model("SiT-Ti/2", method="repa", input_size=8, in_channels=3, num_classes=4, encoder_dim=64)
    reg.save_checkpoint(str(tmp_path / "repa.pt"), dict(ema=plain.state_dict(), config=vars(plain.cfg)))
    with pytest.raises(SystemExit, match="REG token"):
        run(tmp_path / "repa.pt", tmp_path / "repa", "--encoder", ENC, "--encoder-weights", "random")
    with pytest.raises(SystemExit, match="does not fit"):
        torch.save(
            dict(ema=plain.state_dict(), config=vars(reg.make_model("SiT-Ti/2", input_size=16).cfg)), tmp_path / "x.pt"
        )
        run(tmp_path / "x.pt", tmp_path / "x")


# Issue 11 -------------------------------------------------------------------------------------------------------------


def test_a_replaced_checkpoint_is_refused_by_its_weights(ckpt, tmp_path):
    """11.2: a folder records a fingerprint of the weights, not the checkpoint's path: a file replaced by another
    model's is refused; the same weights at another path continue the folder."""
    path = tmp_path / "run" / "0000007.pt"
    path.parent.mkdir()
    shutil.copy(ckpt, path)
    flags = ["--npz", "--num-samples", 6, "--shard-size", 3]
    full = npz(run(ckpt, tmp_path / "full", *flags)["path"])
    assert run(path, tmp_path / "out", *flags, "--max-shards", 1) == dict(done=1, shards=2)
    torch.manual_seed(1)
    other = perturbed(reg.make_model("SiT-Ti/2", input_size=8, in_channels=3, num_classes=4, encoder_dim=64))
    reg.Run(str(path.parent)).save(7, other, other, torch.optim.AdamW(other.parameters()))  # same path, model B
    shard = tmp_path / "out" / "shard-0000000-0000003.npz"
    before = shard.read_bytes()
    with pytest.raises(SystemExit, match="weights: [0-9a-f]{16} there, [0-9a-f]{16} now"):
        run(path, tmp_path / "out", *flags)
    assert shard.read_bytes() == before and not (tmp_path / "out" / "samples_6.npz").exists()
    shutil.copy(ckpt, tmp_path / "moved.pt")  # model A under another name
    assert np.array_equal(npz(run(tmp_path / "moved.pt", tmp_path / "out", *flags)["path"]), full)


def test_a_run_finishes_at_another_batch_size(ckpt, tmp_path):
    """11.2: samples do not depend on the batch size, so a run started at one batch size (out of memory, say) finishes
    at another, equal to the uninterrupted run; settings.json does not record it."""
    flags = ["--npz", "--num-samples", 8, "--shard-size", 3, "--sampler", "sde"]
    full = npz(run(ckpt, tmp_path / "full", *flags)["path"])  # batches of 3
    run(ckpt, tmp_path / "out", *flags, "--max-shards", 1, "--batch-size", 2)
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert "batch_size" not in settings and re.fullmatch("[0-9a-f]{16}", settings["weights"])
    resumed = npz(run(ckpt, tmp_path / "out", *flags, "--batch-size", 1)["path"])
    assert np.array_equal(full, resumed)  # one CPU thread (conftest): exact


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2, 3], "holds a list, not a checkpoint"),
        ({"weight": torch.zeros(2)}, "its file holds no SiT weights"),
        ({"ema": {"weight": torch.zeros(2)}, "step": 3}, "its 'ema' entry holds no SiT weights"),
        ({"model": {}, "step": 3}, "has no 'ema' weights"),
        (b"not a checkpoint", "cannot be read"),
    ],
)
def test_files_that_hold_no_model_exit_with_a_message(tmp_path, content, message):
    """11.6: a .pt holding a list, tensors without SiT weights, or garbage: a message, no traceback."""
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(SystemExit, match=message):
        run(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_exits_with_a_message(ckpt, tmp_path):
    """11.6: --out naming an existing file (FileExistsError before): a message, the file untouched."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--out .*notes.txt is a file: pass a folder"):
        run(ckpt, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_latent_models_decode_with_the_checkpoints_vae(tmp_path, monkeypatch):
    """11.7: the VAE the checkpoint records (train_imagenet.py saves vae=) decodes without --vae (offline: no hub);
    --vae ema / mse name the SD-VAEs as REG's and REPA's scripts do, through reg.load_vae."""
    vae = tiny_vae(tmp_path / "vae")
    ckpt = latent_checkpoint(tmp_path / "latent.pt", vae=str(tmp_path / "vae"))
    r = run(ckpt, tmp_path / "out", "--per-row", 1, "--sampler", "euler")
    assert np.asarray(Image.open(r["path"])).shape == (3 * 32, 32, 3)
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["vae"] == str(tmp_path / "vae")
    asked = []
    monkeypatch.setattr(reg, "load_vae", lambda name, device: asked.append(name) or vae)
    run(ckpt, tmp_path / "mse", "--per-row", 1, "--sampler", "euler", "--vae", "mse")
    run(latent_checkpoint(tmp_path / "plain.pt"), tmp_path / "ema", "--per-row", 1, "--sampler", "euler")
    assert asked == ["mse", "ema"]  # the flag, else the paper's VAE


def test_default_folder_names_the_run_and_merged_shards_are_removed(ckpt, tmp_path, monkeypatch):
    """11.7: every run has a 0000007.pt, so the default folder is samples/<run folder>-<checkpoint>; once merged into
    samples_N.npz the shards go (unless --keep-shards), and a rerun reads the merged file instead of sampling again."""
    monkeypatch.chdir(tmp_path)
    flags = ["--npz", "--num-samples", 5, "--shard-size", 2]
    r = run(ckpt, None, *flags)
    folder = os.path.join("samples", f"{os.path.basename(os.path.dirname(ckpt))}-0000007")
    assert r["path"] == os.path.join(folder, "samples_5.npz") and not list(Path(folder).glob("shard-*"))
    stamp = os.stat(r["path"]).st_mtime_ns
    again = run(ckpt, None, *flags)
    assert again == r and os.stat(r["path"]).st_mtime_ns == stamp
    kept = run(ckpt, tmp_path / "kept", *flags, "--keep-shards")
    assert len(list((tmp_path / "kept").glob("shard-*.npz"))) == 3
    assert np.array_equal(npz(kept["path"]), npz(r["path"]))


def test_export_in_the_release_layout_round_trips(ckpt, tmp_path):
    """11.8: --export writes our EMA weights under the release's names (.pt: {'ema', 'model'} as its sample_ddp.py
    reads, .safetensors: the weights); they load back (reg.load_weights, config_from_state_dict) to the same model."""
    official = json.loads(open(os.path.join(os.path.dirname(__file__), "official_keys_sit_xl2_reg.json")).read())

    def layout(keys):
        return {re.sub(r"^blocks\.\d+\.", "blocks.N.", k) for k in keys}

    ema = reg.load_weights(
        reg.SiT(reg.SiTConfig(**reg.load_checkpoint(ckpt)["config"])), reg.load_checkpoint(ckpt)["ema"]
    )
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0.3, 0.8])
    y = torch.tensor([1, 3])
    cls = torch.randn(2, 64)
    ours = npz(run(ckpt, tmp_path / "ours", "--npz", "--num-samples", 4)["path"])
    for name in ("exported.pt", "exported.safetensors"):
        r = run(ckpt, tmp_path / "unused", "--export", tmp_path / name)
        assert r["path"] == str(tmp_path / name) and not (tmp_path / "unused").exists()
        if name.endswith(".pt"):
            saved = torch.load(tmp_path / name, weights_only=True)
            assert set(saved) == {"ema", "model", "config"} and saved["model"].keys() == saved["ema"].keys()
            sd = saved["ema"]
        else:
            from safetensors.torch import load_file

            sd = load_file(tmp_path / name)
        assert {"cls_projectors2.weight", "wg_norm.weight", "projectors.0.0.weight"} <= set(sd)
        assert not any(k.startswith(("token_embedder", "token_norm", "projector.")) for k in sd)
        assert layout(sd) <= layout(official)  # every name is one of the release's
        back = reg.load_weights(reg.SiT(reg.config_from_state_dict(sd)), sd).eval()
        for a, b in zip(back(x, t, y, cls), ema.eval()(x, t, y, cls)):
            assert (a is None and b is None) or torch.equal(a, b)
        again = npz(run(tmp_path / name, tmp_path / name.replace(".", "-"), "--npz", "--num-samples", 4)["path"])
        assert np.array_equal(again, ours)
    with pytest.raises(SystemExit, match="exists"):
        run(ckpt, tmp_path / "unused", "--export", tmp_path / "exported.pt")
    with pytest.raises(SystemExit, match=".pt or .safetensors"):
        run(ckpt, tmp_path / "unused", "--export", tmp_path / "exported.bin")


def test_the_releases_label_draw_is_random_per_sample(ckpt, tmp_path):
    """11.9: --labels-random draws each label from (seed, i) as the release draws labels (not class-balanced), so
    batches, shards and resumes still agree."""
    drawn = sample.draw_labels(range(40), [0, 1, 2, 3], 0, True)
    assert drawn == sample.draw_labels(range(40), [0, 1, 2, 3], 0, True)
    assert sample.draw_labels(range(25, 40), [0, 1, 2, 3], 0, True) == drawn[25:]  # sample i's label: (seed, i)
    assert sample.draw_labels(range(40), [0, 1, 2, 3], 1, True) != drawn
    assert drawn != [i % 4 for i in range(40)] and set(drawn) == {0, 1, 2, 3}
    assert sample.draw_labels(range(6), [2, 3], 0, False) == [2, 3, 2, 3, 2, 3]
    flags = ["--npz", "--num-samples", 6, "--labels-random", "--sampler", "euler"]
    a = npz(run(ckpt, tmp_path / "a", *flags)["path"])
    b = npz(run(ckpt, tmp_path / "b", *flags, "--batch-size", 2, "--shard-size", 4)["path"])
    balanced = npz(run(ckpt, tmp_path / "c", *flags[:-3], "--sampler", "euler")["path"])
    labels = sample.draw_labels(range(6), [0, 1, 2, 3], 0, True)
    same = [i for i in range(6) if labels[i] == i % 4]
    assert np.array_equal(a, b)
    assert all(np.array_equal(a[i], balanced[i]) == (i in same) for i in range(6))


def test_uint8_truncate_is_the_releases_conversion(ckpt, tmp_path):
    """11.9: 'truncate' is the release's generate.py, 255 (x + 1) / 2 clipped and cast (rounded down); 'round', ours,
    takes the nearest level. They differ by one level wherever the fraction is >= 1/2, about half the values."""
    x = torch.linspace(-1.2, 1.2, 100001).view(1, 1, -1, 1).expand(1, 3, -1, 1)
    truncated = sample.to_uint8(x, "truncate")
    rounded = sample.to_uint8(x, "round")
    release = np.clip(255.0 * ((x.numpy() + 1) / 2.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    ours = np.round((np.clip(x.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert truncated.shape == (1, 100001, 1, 3) and np.array_equal(truncated.numpy(), release)
    assert np.array_equal(rounded.numpy(), ours)
    step = rounded.numpy().astype(int) - truncated.numpy()
    assert set(np.unique(step)) == {0, 1} and 0.4 < step.mean() < 0.6  # truncation: half a level darker
    a = npz(run(ckpt, tmp_path / "a", "--npz", "--num-samples", 4, "--uint8", "truncate")["path"])
    b = npz(run(ckpt, tmp_path / "b", "--npz", "--num-samples", 4)["path"])
    assert set(np.unique(b.astype(int) - a)) == {0, 1}
    with pytest.raises(SystemExit, match="uint8: truncate there, round now"):
        run(ckpt, tmp_path / "a", "--npz", "--num-samples", 4)


def test_tf32_is_off_unless_asked(ckpt, tmp_path, monkeypatch):
    """11.9: --tf32 (the release's default on GPUs) sets exactly the two TF32 switches; without it both are off."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default for cuDNN
    run(ckpt, tmp_path / "a", "--bench", 1, "--tf32", "--sample-steps", 1)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    run(ckpt, tmp_path / "b", "--bench", 1, "--sample-steps", 1)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_token_consistency_compares_with_what_the_slot_stands_for(tmp_path, monkeypatch):
    """11.10: for reg-mean the token stands for the mean of the encoder's patch tokens (reg.token_target), so token
    consistency compares the generated token with that, not with the class token."""
    torch.manual_seed(0)
    model = perturbed(
        reg.make_model("SiT-Ti/2", method="reg-mean", input_size=8, in_channels=3, num_classes=4, encoder_dim=64)
    ).eval()
    reg.save_checkpoint(str(tmp_path / "mean.pt"), dict(ema=model.state_dict(), config=vars(model.cfg)))
    encoder = reg.load_encoder(ENC, model.cfg.grid, "random")
    args = sample.parse_args([str(tmp_path / "mean.pt"), "--sample-steps", "3"])
    images, cls = sample.sample_batch(model, None, range(4), [0, 1, 2, 3], args, torch.device("cpu"))
    feats = encoder(images)
    got = sample.token_consistency(model.cfg, encoder, images, cls)
    assert torch.allclose(got, torch.cosine_similarity(feats[1].mean(1), cls, dim=-1))
    assert not torch.allclose(got, torch.cosine_similarity(feats[0], cls, dim=-1))
    monkeypatch.setattr(reg, "load_encoder", lambda *args, **kwargs: encoder)
    r = run(tmp_path / "mean.pt", tmp_path / "out", "--npz", "--num-samples", 4, "--batch-size", 4, "--encoder", ENC)
    assert r["token_consistency"] == pytest.approx(float(got.mean()), abs=1e-6)

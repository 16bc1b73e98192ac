"""Tests of train_imagenet.py on CPU, offline: a generated ImageFolder, a tiny random SD-VAE-layout AutoencoderKL,
SiT-Ti/2 on 4x4 latents (32 px images) and a random DINOv2-S at 28 px (grid 2)."""

import functools
import json
import logging
import logging.handlers
import os
import shutil
import signal
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for the hub
diffusers = pytest.importorskip("diffusers")
import reg  # noqa: E402
import train_imagenet as ti  # noqa: E402

TINY = ["--model", "SiT-Ti/2", "--encoder", "vit_small_patch14_dinov2.lvd142m", "--encoder-weights", "random",
        "--device", "cpu", "--batch-size", "4", "--micro-batch", "2", "--sample-every", "0"]  # fmt: skip


def prepare(root, out, *extra):
    return ti.main(["prepare", "--data-dir", str(root / "images"), "--out", str(out), "--resolution", "32", "--vae",
                    str(root / "vae"), "--shard-size", "5", "--workers", "0", "--batch-size", "3", *extra])  # fmt: skip


def train(prep, out, *extra):
    return ti.main(["train", "--data-dir", str(prep), "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module", autouse=True)
def shared_encoder():
    """One random encoder built once (it is frozen, so runs can share it; building it is most of a short run's time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reg, "load_encoder", functools.lru_cache(reg.load_encoder))
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / "images" / f"n0{c}")
        for i in range(4):
            w, h = (80, 64) if (c, i) == (0, 0) else (48, 40)  # the first image takes ADM's BOX-halving branch
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"n0{c}" / f"{i}.png")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                            norm_num_groups=4).save_pretrained(root / "vae")  # fmt: skip
    prepare(root, root / "prep")
    return root


def load(path):
    return torch.load(path, weights_only=True)


def mtimes(folder, n=3):
    return [os.stat(folder / f"shard_0000{i}.pt").st_mtime_ns for i in range(n)]


def same_shards(a, b):
    return all(torch.equal(load(a / f"shard_0000{i}.pt")[k], load(b / f"shard_0000{i}.pt")[k])
               for i in range(3) for k in ti.SHARD_KEYS)  # fmt: skip


def test_prepare_writes_crops_and_posteriors(root):
    meta = json.load(open(root / "prep" / "manifest.json"))
    assert meta["complete"] and meta["counts"] == [5, 5, 2] and meta["classes"] == ["n00", "n01", "n02"]
    shard = load(root / "prep" / "shard_00000.pt")
    assert shard["images"].shape == (5, 3, 32, 32) and shard["images"].dtype == torch.uint8
    assert shard["mean"].shape == shard["std"].shape == (5, 4, 4, 4) and shard["mean"].dtype == torch.float16
    assert shard["labels"].tolist() == [0, 0, 0, 0, 1]
    # 80x64 -> BOX halving to 40x32 (short side 64 >= 2 x 32) -> bicubic to the same size -> centre columns 4..35
    with Image.open(root / "images" / "n00" / "0.png") as im:
        want = np.asarray(im.convert("RGB").resize((40, 32), Image.BOX))[:, 4:36]
    assert np.array_equal(shard["images"][0].permute(1, 2, 0).numpy(), want)
    diffusers_log = logging.getLogger("diffusers")
    records = logging.handlers.BufferingHandler(100)
    diffusers_log.addHandler(records)
    vae = reg.load_vae(str(root / "vae"), "cpu")
    diffusers_log.removeHandler(records)
    warnings = [r.getMessage() for r in records.buffer if r.levelno >= logging.WARNING]
    assert warnings == [], "loading the VAE warns (a missing optional package such as accelerate?)"
    with torch.no_grad():
        post = vae.encode(shard["images"].float() / 127.5 - 1).latent_dist
    assert torch.allclose(shard["mean"].float(), post.mean, atol=2e-3)
    assert torch.allclose(shard["std"].float(), post.std, rtol=2e-3)


def test_interrupted_preparation_is_refused_then_resumed(root, tmp_path):
    prep = tmp_path / "prep"
    shutil.copytree(root / "prep", prep)
    os.remove(prep / "shard_00002.pt")
    with pytest.raises(SystemExit, match="incomplete"):
        train(prep, tmp_path / "run")
    before = mtimes(prep, 2)
    prepare(root, prep)
    assert mtimes(prep, 2) == before  # finished shards skipped
    assert same_shards(prep, root / "prep")
    assert json.load(open(prep / "manifest.json"))["done"] == [f"shard_0000{i}.pt" for i in range(3)]


def test_fixing_the_image_it_names_lets_prepare_finish(root, tmp_path):
    """Issue 11 (6): an unreadable image is named with the fix; after the fix (here: deleting it, which changes the
    image count) the same command finishes, keeping the shards made before the bad image."""
    shutil.copytree(root / "images", tmp_path / "images")
    (tmp_path / "images" / "n01" / "bad.jpg").write_bytes(b"not an image")  # sorted last in n01: row 8, shard 1
    shutil.copytree(root / "vae", tmp_path / "vae")
    prep = tmp_path / "prep"
    with pytest.raises(SystemExit, match=r"n01/bad\.jpg cannot be read .*replace or delete the file, then rerun"):
        prepare(tmp_path, prep)
    first = os.stat(prep / "shard_00000.pt").st_mtime_ns
    os.remove(tmp_path / "images" / "n01" / "bad.jpg")
    prepare(tmp_path, prep)  # the old code: "holds another preparation"
    assert os.stat(prep / "shard_00000.pt").st_mtime_ns == first
    assert json.load(open(prep / "manifest.json"))["complete"] and same_shards(prep, root / "prep")
    os.makedirs(tmp_path / "images" / "n03")  # another class: another preparation, refused
    Image.new("RGB", (40, 40)).save(tmp_path / "images" / "n03" / "0.png")
    with pytest.raises(SystemExit, match="holds another preparation .*classes"):
        prepare(tmp_path, prep)


def test_truncated_shard_or_corrupt_manifest_is_named_and_prepare_repairs_it(root, tmp_path):
    """Issue 11 (6): `train` names the bad file and the fix instead of a traceback; rerunning `prepare` repairs both."""
    prep = tmp_path / "prep"
    shutil.copytree(root / "prep", prep)
    data = (prep / "shard_00001.pt").read_bytes()
    (prep / "shard_00001.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"shard_00001\.pt cannot be read .*truncated or corrupt.*prepare"):
        train(prep, tmp_path / "run")
    (prep / "manifest.json").write_text('{"classes": ["n00", "n01"')
    with pytest.raises(SystemExit, match=r"manifest\.json cannot be read .*rerun the `prepare` command"):
        train(prep, tmp_path / "run")
    kept = [mtimes(prep)[i] for i in (0, 2)]
    prepare(root, prep)
    assert [mtimes(prep)[i] for i in (0, 2)] == kept and same_shards(prep, root / "prep")
    shutil.copy(prep / "shard_00000.pt", prep / "shard_00001.pt")  # readable, the right size, the wrong images
    with pytest.raises(SystemExit, match=r"shard_00001\.pt does not belong to the preparation"):
        train(prep, tmp_path / "run")
    prepare(root, prep)
    assert same_shards(prep, root / "prep")
    shards, meta = ti.load_prepared(str(prep))
    assert meta["complete"] and len(shards) == 3


def test_bad_input_says_what_to_do(root, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "flat")
    with pytest.raises(SystemExit, match="not an ImageFolder"):
        ti.main(["prepare", "--data-dir", str(tmp_path / "flat"), "--out", str(tmp_path / "p0")])
    shutil.copytree(root / "images", tmp_path / "small")
    Image.new("RGB", (20, 30)).save(tmp_path / "small" / "n01" / "tiny.png")
    with pytest.raises(SystemExit, match=r"tiny\.png: it is 20x30.*--upscale"):
        ti.main(["prepare", "--data-dir", str(tmp_path / "small"), "--out", str(tmp_path / "p1"), "--resolution", "32",
                 "--vae", str(root / "vae"), "--workers", "0"])  # fmt: skip
    with pytest.raises(SystemExit, match="--vae"):
        ti.main(["prepare", "--data-dir", str(root / "images"), "--out", str(tmp_path / "p2"),
                 "--vae", str(tmp_path / "none")])  # fmt: skip
    no_weights = [a for a in TINY if a not in ("--encoder-weights", "random")]
    with pytest.raises(SystemExit, match="--encoder-weights"):  # DINOv2 offline, no file
        ti.main(["train", "--data-dir", str(root / "prep"), "--out", str(tmp_path / "r"), *no_weights,
                 "--encoder", "dinov2-s"])  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="not a multiple"):
        train(root / "prep", tmp_path / "r")


BAD_NUMBERS = [
    ("train", "--steps", "0", "an integer >= 1"),  # the old code: exit 0 having done nothing
    ("train", "--steps", "-5", "an integer >= 1"),
    ("train", "--keep", "-1", "an integer >= 0"),  # the old code had no --keep; Run(keep=-1) deletes every checkpoint
    ("train", "--ckpt-every", "0", "an integer >= 1"),  # the old code: ZeroDivisionError
    ("train", "--log-every", "0", "an integer >= 1"),
    ("train", "--batch-size", "0", "an integer >= 1"),
    ("train", "--micro-batch", "-2", "an integer >= 1"),
    ("train", "--lr", "0", "a finite number > 0"),
    ("train", "--lr", "nan", "a finite number > 0"),
    ("train", "--ema", "1.5", "a number from 0 to 1"),
    ("train", "--clip", "-1", "a finite number > 0"),
    ("train", "--beta", "-0.1", "a finite number >= 0"),
    ("train", "--lam", "x", "a finite number >= 0"),
    ("train", "--sample-every", "-1", "an integer >= 0"),
    ("train", "--sample-steps", "0", "an integer >= 1"),
    ("train", "--resolution", "30", "not a multiple of 8"),
    ("train", "--bench", "-1", "an integer >= 0"),
    ("train", "--warmup", "1.5", "an integer >= 0"),
    ("prepare", "--shard-size", "0", "an integer >= 1"),
    ("prepare", "--workers", "-1", "an integer >= 0"),
    ("prepare", "--batch-size", "0", "an integer >= 1"),
    ("prepare", "--resolution", "0", "an integer >= 1"),
]


@pytest.mark.parametrize("command, flag, value, allowed", BAD_NUMBERS)
def test_numeric_flags_are_checked_when_parsed(command, flag, value, allowed, capsys):
    """Issue 11 (3): a bad number fails at parse time; the error names the flag and the allowed range."""
    required = ["--data-dir", "d", "--out", "o"]
    with pytest.raises(SystemExit) as stopped:
        ti.parser().parse_args([command, *required, flag, value])
    assert stopped.value.code == 2
    assert (
        f"argument {flag}: '{value}' is {'' if 'multiple' in allowed else 'not '}{allowed}" in capsys.readouterr().err
    )


def weights(folder, step):
    state = load(os.path.join(folder, f"{step:07d}.pt"))
    return state["model"], state["ema"]


def ddp_worker(rank, port, argv):
    """What torchrun sets up for each process (gloo on CPU)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    ti.main(argv)


def test_two_processes_equal_one_and_resume_is_exact(root, tmp_path):
    prep = root / "prep"
    one = tmp_path / "one"
    micro = [
        "--micro-batch",
        "1",
    ]  # 4 micro-batches a step on one process, 2 on each of two (DDP's no_sync on the first)
    train(prep, one, *micro, "--steps", "3", "--log-every", "1", "--sample-every", "2", "--sample-steps", "2",
          "--vae", str(root / "vae"))  # fmt: skip
    assert (one / "samples_0000002.png").is_file() and (one / "losses.png").is_file()
    assert json.load(open(one / "args.json"))["batch_size"] == 4
    log = reg.read_log(str(one / "log.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3]
    two = str(tmp_path / "two")  # 1 step, then resumed to 3: every rank must resume its optimiser too
    for steps in (["--steps", "1"], ["--steps", "3", "--resume"]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # forked, not spawned: the children skip importing torch and timm
        argv = ["train", "--data-dir", str(prep), "--out", two, *TINY, *micro, *steps, "--log-every", "1"]
        torch.multiprocessing.start_processes(ddp_worker, (port, argv), nprocs=2, start_method="fork")
    (m1, e1), (m2, e2) = weights(one, 3), weights(two, 3)
    init = reg.make_model("SiT-Ti/2", input_size=4, num_classes=3, encoder_dim=384).state_dict()
    assert any(not torch.allclose(m1[k], init[k]) for k in m1)  # it did train
    for a, b in ((m1, m2), (e1, e2)):
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), "DDP run differs from the one-process run"
    part = tmp_path / "part"  # logs only where it saves (steps 1 and 3): the mean over each interval
    train(prep, part, *micro, "--steps", "1")
    train(prep, part, *micro, "--steps", "3", "--resume")
    m3, e3 = weights(part, 3)
    assert all(torch.equal(m1[k], m3[k]) and torch.equal(e1[k], e3[k]) for k in m1), "resume is not exact"
    logged = reg.read_log(str(part / "log.jsonl"))
    assert [r["step"] for r in logged] == [1, 3]
    for key in ti.LOGGED:
        assert logged[1][key] == pytest.approx((log[1][key] + log[2][key]) / 2, rel=1e-5)


def test_resume_may_lower_the_lr_but_not_change_the_experiment(root, tmp_path):
    """Issue 11 (4): the non-finite stop says 'lower --lr'; a resume accepts that (and logs it), but refuses another
    experiment: another loss weight, or another preparation in --data-dir."""
    run = tmp_path / "run"
    train(root / "prep", run, "--steps", "1")
    with pytest.raises(SystemExit, match=r"--beta: checkpoint 0.03, now 0.05"):
        train(root / "prep", run, "--steps", "2", "--resume", "--beta", "0.05")
    other = tmp_path / "other"  # the same images and classes, other shards: another preparation
    prepare(root, other, "--shard-size", "6")
    with pytest.raises(SystemExit, match=r"--data: checkpoint '\w+', now '\w+'"):
        train(other, run, "--steps", "2", "--resume")
    train(root / "prep", run, "--steps", "2", "--resume", "--lr", "5e-5")
    assert [g["lr"] for g in load(run / "0000002.pt")["opt"]["param_groups"]] == [5e-5]
    notes = [r["note"] for r in reg.read_log(str(run / "log.jsonl")) if "note" in r]
    assert notes == ["--lr changed from 0.0001 to 5e-05"]


def test_ctrl_c_finishes_the_step_and_saves(root, tmp_path, monkeypatch):
    calls = []
    reg_loss = reg.reg_loss

    def loss_then_ctrl_c(*args, **kwargs):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # in the first of the step's two micro-batches
        calls.append(1)
        return reg_loss(*args, **kwargs)

    monkeypatch.setattr(reg, "reg_loss", loss_then_ctrl_c)
    monkeypatch.setattr(reg, "StepTimer", None)  # only --bench times the phases (a timer waits for the GPU)
    train(root / "prep", tmp_path, "--steps", "9", "--log-every", "5")
    assert len(calls) == 2, "the step was not finished, or another one began"
    assert [os.path.basename(p) for p in reg.list_checkpoints(str(tmp_path))] == ["0000001.pt"]


def test_nonfinite_loss_stops_without_saving_it(root, tmp_path):
    with pytest.raises(SystemExit, match="non-finite.*--resume and a lower --lr"):
        train(root / "prep", tmp_path, "--steps", "3", "--lr", "1e30", "--log-every", "1", "--ckpt-every", "1")
    for path in reg.list_checkpoints(str(tmp_path)):
        assert all(torch.isfinite(v).all() for v in load(path)["model"].values())


def test_release_default_has_no_flips_and_unconditional_has_one_class(root):
    """Issue 11 (9): by default the batch holds the stored crops and posteriors as they are (the release); --flip
    mirrors image and posterior together. --unconditional: every label 0, a model of one class."""
    shards, meta = ti.load_prepared(str(root / "prep"))
    starts = torch.tensor([0, 5, 10, 12])
    rows = torch.arange(12)
    stored = torch.cat([s["images"] for s in shards])
    mean = torch.cat([s["mean"] for s in shards]).float()
    still = [dict(s, std=torch.zeros_like(s["std"])) for s in shards]  # x = the posterior mean, scaled
    args = ti.parser().parse_args(["train", "--data-dir", "d", *TINY])
    torch.manual_seed(0)
    x, y, images = ti.get_batch(still, starts, rows, torch.device("cpu"), args)
    assert torch.equal(images, stored) and torch.allclose(x, mean * reg.LATENT_SCALE)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    args = ti.parser().parse_args(["train", "--data-dir", "d", *TINY, "--flip", "--unconditional"])
    x, y, images = ti.get_batch(still, starts, rows, torch.device("cpu"), args)
    flipped = [not torch.equal(a, b) for a, b in zip(images, stored)]
    assert 0 < sum(flipped) < 12 and y.tolist() == [0] * 12
    for i in range(12):
        image, latent = (stored[i].flip(-1), mean[i].flip(-1)) if flipped[i] else (stored[i], mean[i])
        assert torch.equal(images[i], image) and torch.allclose(x[i], latent * reg.LATENT_SCALE)
    _, model, _, _, _ = ti.setup_model(args, meta, torch.device("cpu"))
    assert model.cfg.num_classes == 1


def test_bench_reports_speed_and_flops():
    r = ti.main(["train", "--synthetic", "--bench", "1", "--warmup", "1", "--resolution", "32", *TINY])
    phases = ("ms_data", "ms_encoder", "ms_fwd_bwd", "ms_optimizer")
    assert r["images_per_s"] > 0 and min(r[k] for k in phases) > 0
    assert r["ms_step"] == pytest.approx(sum(r[k] for k in phases))
    enc = reg.load_encoder("vit_small_patch14_dinov2.lvd142m", 2, "random", torch.device("cpu"))  # 28 px
    with FlopCounterMode(display=False) as counter:  # PyTorch's own count
        enc(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    assert reg.encoder_flops(enc) == pytest.approx(counter.get_total_flops(), rel=0.03)
    cfg = reg.make_model("SiT-Ti/2", input_size=4, num_classes=1000, encoder_dim=384).cfg
    flops = 3 * reg.model_flops(cfg) + reg.encoder_flops(enc)  # what --bench divides by the time
    assert r["tflops"] == pytest.approx(flops * r["images_per_s"] / 1e12)


def test_plain_sit_never_loads_or_runs_an_encoder():
    argv = ["train", "--synthetic", "--bench", "1", "--warmup", "1", "--resolution", "32", *TINY, "--method", "sit"]
    r = ti.main([a if a != "vit_small_patch14_dinov2.lvd142m" else "no-such-encoder" for a in argv])
    assert r["ms_encoder"] < 1 and r["images_per_s"] > 0

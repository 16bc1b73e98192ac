"""Tests of train_imagenet.py on CPU, offline: a generated ImageFolder (3 classes x 4 images), a tiny randomly
initialised AutoencoderKL of the SD-VAE's architecture, SiT-Ti/2 on 4x4 latents (32 px) and a random DINOv2-S at
28 px (grid 2)."""

import collections
import copy
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for the hub
diffusers = pytest.importorskip("diffusers")
import reg  # noqa: E402
import train_imagenet as ti  # noqa: E402
from tests.conftest import count_host_reads, cuda_waits_in_step_2, lock_held_elsewhere, snapshots_after_each_step  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the REG token is 384 wide")  # SiT-Ti is narrower than DINOv2-S
ENCODER = "vit_small_patch14_dinov2.lvd142m"
DEVICE = os.environ.get("REG_TEST_DEVICE", "cpu")  # pytest --device cuda: training and DDP (NCCL) on GPUs
CUDA = DEVICE.startswith("cuda")
LOGGED = ("loss", "denoise", "denoise_cls", "align", "grad_norm", "skipped")  # what every log record sums
TINY = ["--model", "SiT-Ti/2", "--encoder", ENCODER, "--encoder-weights", "random", "--device", DEVICE]
TINY += ["--batch-size", "4", "--micro-batch", "2"]


def prepare(root, out, *extra):
    argv = ["prepare", "--data-dir", str(root / "images"), "--out", str(out), "--resolution", "32"]
    return ti.main([*argv, "--vae", str(root / "vae"), "--shard-size", "5", *extra])


def train(prep, out, *extra):
    return ti.main(["train", "--data-dir", str(prep), "--out", str(out), *TINY, *extra])


def load(path):
    return torch.load(path, weights_only=True)


def mtimes(folder):
    return [os.stat(folder / f"shard_0000{i}.pt").st_mtime_ns for i in range(3)]


def same_shards(a, b):
    """Whether two preparations hold the same tensors, shard by shard."""
    for i in range(3):
        x = load(a / f"shard_0000{i}.pt")
        y = load(b / f"shard_0000{i}.pt")
        if not all(torch.equal(x[key], y[key]) for key in ti.SHARD_KEYS):
            return False
    return True


def log_records(run):
    return [r for r in reg.read_log(str(run / "log.jsonl")) if "loss" in r]


def signal_in_first_loss(reg_loss, signum, calls, *args, **kwargs):
    """reg.reg_loss that sends this process `signum` on its first call (Ctrl-C: SIGINT; a scheduler: SIGTERM)."""
    if not calls:
        os.kill(os.getpid(), signum)
    calls.append(1)
    return reg_loss(*args, **kwargs)


def overflow_in_step_2(reg_loss, calls, *args, **kwargs):
    """reg.reg_loss whose loss is 1e4 times larger in step 2 (calls 3 and 4 of every 12: two micro-batches a step)."""
    losses = reg_loss(*args, **kwargs)
    calls.append(1)
    if len(calls) % 12 in (3, 4):
        losses["loss"] = losses["loss"] * 1e4
    return losses


def no_encoder(*args, **kwargs):
    raise AssertionError("plain SiT loaded an encoder")


def signal_in_save(save, signum, *args, **kwargs):
    """torch.save that sends this process `signum` in the middle of its write."""
    os.kill(os.getpid(), signum)
    return save(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def shared_encoder():
    """One random encoder per setting (frozen, so runs can share it; building it is most of a short run's time)."""
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
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # 8x smaller
    small = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(**blocks, **small)
    vae.save_pretrained(root / "vae")
    prepare(root, root / "prep")
    return root


# Prepare ------------------------------------------------------------------------------------------------------------


def test_prepare_writes_crops_and_posteriors(root):
    manifest = json.loads((root / "prep" / "manifest.json").read_text())
    assert manifest["counts"] == [5, 5, 2] and manifest["classes"] == ["n00", "n01", "n02"]
    assert manifest["shards"] == [f"shard_0000{i}.pt" for i in range(3)] and len(set(manifest["sources"])) == 3
    shard = load(root / "prep" / "shard_00000.pt")
    assert shard["images"].shape == (5, 3, 32, 32) and shard["images"].dtype == torch.uint8
    assert shard["mean"].shape == shard["std"].shape == (5, 4, 4, 4) and shard["mean"].dtype == torch.float16
    assert shard["labels"].tolist() == [0, 0, 0, 0, 1] and shard["source"] == manifest["sources"][0]
    # 80x64 -> BOX halving to 40x32 (short side 64 >= 2 x 32) -> bicubic to the same size -> centre columns 4..35
    with Image.open(root / "images" / "n00" / "0.png") as im:
        want = np.asarray(im.convert("RGB").resize((40, 32), Image.BOX))[:, 4:36]
    assert np.array_equal(shard["images"][0].permute(1, 2, 0).numpy(), want)
    vae = reg.load_vae(str(root / "vae"), "cpu")
    with torch.no_grad():
        posterior = vae.encode(shard["images"].float() / 127.5 - 1).latent_dist
    assert torch.allclose(shard["mean"].float(), posterior.mean, atol=2e-3)
    assert torch.allclose(shard["std"].float(), posterior.std, rtol=2e-3)


def test_16_bit_greys_are_scaled_not_clipped_to_white(tmp_path):
    grey = np.full((40, 48), 128 * 257, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    crop = ti.load_crop(str(tmp_path / "grey16.png"), 32)
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8 and bool((crop == 128).all())


def test_interrupted_preparation_is_refused_then_finished_under_torchrun(root, tmp_path, monkeypatch):
    """Each process of a torchrun preparation makes every WORLD_SIZE-th shard; `train` names a missing shard; the same
    command again makes only what is missing."""
    prep = tmp_path / "prep"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    prepare(root, prep)
    assert sorted(p.name for p in prep.glob("shard_*")) == ["shard_00001.pt"]
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(SystemExit, match=r"shard_00000\.pt is missing, truncated or stale: rerun the `prepare`"):
        train(prep, tmp_path / "run")
    made = os.stat(prep / "shard_00001.pt").st_mtime_ns
    prepare(root, prep)
    assert os.stat(prep / "shard_00001.pt").st_mtime_ns == made  # kept
    assert same_shards(prep, root / "prep")


def test_fixing_or_replacing_an_image_remakes_only_its_shards(root, tmp_path):
    shutil.copytree(root / "images", tmp_path / "images")
    shutil.copytree(root / "vae", tmp_path / "vae")
    (tmp_path / "images" / "n01" / "bad.jpg").write_bytes(b"not an image")  # sorted last in n01: row 8, shard 1
    prep = tmp_path / "prep"
    with pytest.raises(SystemExit, match=r"n01/bad\.jpg cannot be read .*replace or delete it and rerun"):
        prepare(tmp_path, prep)
    first = os.stat(prep / "shard_00000.pt").st_mtime_ns  # made before the bad image
    os.remove(tmp_path / "images" / "n01" / "bad.jpg")
    prepare(tmp_path, prep)
    assert os.stat(prep / "shard_00000.pt").st_mtime_ns == first and same_shards(prep, root / "prep")
    # another image under the same name (shard 0, row 1): that shard is made again, from the new pixels
    before = mtimes(prep)
    new = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(new).save(tmp_path / "images" / "n00" / "1.png")
    prepare(tmp_path, prep)
    after = mtimes(prep)
    assert after[0] != before[0] and after[1:] == before[1:]
    stored = load(prep / "shard_00000.pt")["images"][1].permute(1, 2, 0).numpy()
    assert np.array_equal(stored, ti.center_crop(Image.fromarray(new), 32))
    # another class list is another preparation: refused, the folder untouched
    os.makedirs(tmp_path / "images" / "n03")
    Image.new("RGB", (40, 40)).save(tmp_path / "images" / "n03" / "0.png")
    with pytest.raises(SystemExit, match="holds another preparation: pass another --out"):
        prepare(tmp_path, prep)
    assert mtimes(prep) == after


def test_the_vae_counts_by_its_weights_not_its_folder(root, tmp_path, monkeypatch):
    """--vae ./vae and --vae /abs/vae, or a copy elsewhere, are one preparation (nothing remade); the manifest keeps
    the absolute path, so sample.py finds the VAE from any working folder. Other weights in the same folder remake
    every shard, and a run trained on the old shards refuses to continue on the new ones."""
    shutil.copytree(root / "vae", tmp_path / "vae")
    prep = tmp_path / "prep"
    prepare(root, prep)
    made = mtimes(prep)
    monkeypatch.chdir(root)
    argv = ["prepare", "--data-dir", "images", "--out", str(prep), "--resolution", "32", "--shard-size", "5"]
    ti.main([*argv, "--vae", "vae"])
    assert mtimes(prep) == made
    ti.main([*argv, "--vae", str(tmp_path / "vae")])
    assert mtimes(prep) == made
    assert json.loads((prep / "manifest.json").read_text())["vae"] == str(tmp_path / "vae")
    train(prep, tmp_path / "run", "--steps", "1")
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")
    vae.decoder.conv_out.bias.data += 1  # other weights under the same name
    vae.save_pretrained(tmp_path / "vae")
    ti.main([*argv, "--vae", str(tmp_path / "vae")])
    assert all(new != old for new, old in zip(mtimes(prep), made))
    with pytest.raises(SystemExit, match=r"data_key: checkpoint '\w+', now '\w+'"):
        train(prep, tmp_path / "run", "--steps", "2")


def test_truncated_or_foreign_shard_is_named_and_prepare_repairs_it(root, tmp_path):
    prep = tmp_path / "prep"
    shutil.copytree(root / "prep", prep)
    data = (prep / "shard_00001.pt").read_bytes()
    (prep / "shard_00001.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"shard_00001\.pt is missing, truncated or stale: rerun the `prepare`"):
        train(prep, tmp_path / "run")
    kept = mtimes(prep)
    prepare(root, prep)
    assert [mtimes(prep)[i] for i in (0, 2)] == [kept[0], kept[2]] and same_shards(prep, root / "prep")
    shutil.copy(prep / "shard_00000.pt", prep / "shard_00001.pt")  # readable, the right size, the wrong images
    with pytest.raises(SystemExit, match=r"shard_00001\.pt is missing, truncated or stale"):
        train(prep, tmp_path / "run")
    prepare(root, prep)
    assert same_shards(prep, root / "prep")


def test_bad_input_says_what_to_do(root, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "flat")
    Image.new("RGB", (40, 40)).save(tmp_path / "flat" / "0.png")
    with pytest.raises(SystemExit, match="not an ImageFolder: put the images in one folder per class"):
        ti.main(["prepare", "--data-dir", str(tmp_path / "flat"), "--out", str(tmp_path / "p0")])
    os.makedirs(tmp_path / "empty" / "n00")
    with pytest.raises(SystemExit, match="no images"):
        ti.main(["prepare", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "p0")])
    shutil.copytree(root / "images", tmp_path / "small")
    Image.new("RGB", (20, 30)).save(tmp_path / "small" / "n01" / "tiny.png")
    small = ["prepare", "--data-dir", str(tmp_path / "small"), "--resolution", "32", "--vae", str(root / "vae")]
    ti.main([*small, "--out", str(tmp_path / "p2")])  # smaller than --resolution: ADM enlarges it
    data = (root / "images" / "n00" / "1.png").read_bytes()
    (tmp_path / "small" / "n01" / "tiny.png").write_bytes(data[: len(data) // 2])  # a truncated file
    with pytest.raises(SystemExit, match=r"image .*tiny\.png cannot be read"):
        ti.main([*small, "--out", str(tmp_path / "p1")])
    os.remove(tmp_path / "small" / "n01" / "tiny.png")
    ti.main([*small, "--out", str(tmp_path / "p1"), "--resolution", "16"])  # p1 has no shard: a new start
    assert json.loads((tmp_path / "p1" / "manifest.json").read_text())["resolution"] == 16
    with pytest.raises(SystemExit, match="--vae"):
        ti.main(["prepare", "--data-dir", str(root / "images"), "--out", str(tmp_path / "p4"), "--vae", "/nowhere"])
    assert not (tmp_path / "p4").exists()  # the VAE loads before anything is written
    with pytest.raises(SystemExit, match="no manifest.json: run prepare first, python train_imagenet.py prepare"):
        train(root / "images", tmp_path / "r0")  # an ImageFolder, not a preparation
    with pytest.raises(
        SystemExit, match=r"SiT-Ti/8's 8x8 patches do not tile the 4x4 latents: pick a --model with a smaller patch"
    ):
        train(root / "prep", tmp_path / "r0", "--model", "SiT-Ti/8")
    if not torch.backends.mps.is_available():
        with pytest.raises(SystemExit, match="has no MPS GPU: use --device cpu"):
            train(root / "prep", tmp_path / "r0", "--device", "mps")
    no_weights = [a for a in TINY if a not in ("--encoder-weights", "random")]
    with pytest.raises(SystemExit, match="--encoder-weights"):  # DINOv2 offline, no file
        ti.main(["train", "--data-dir", str(root / "prep"), "--out", str(tmp_path / "r1"), *no_weights])
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="no multiple of --micro-batch x GPUs"):
        train(root / "prep", tmp_path / "r2")


BAD_NUMBERS = [
    ("train", "--steps", "0", "an integer >= 1"),
    ("train", "--log-every", "0", "an integer >= 1"),
    ("train", "--ckpt-every", "-1", "an integer >= 1"),
    ("train", "--batch-size", "0", "an integer >= 1"),
    ("train", "--micro-batch", "1.5", "an integer >= 1"),
    ("train", "--lr", "nan", "a finite number > 0"),
    ("train", "--beta", "-0.1", "a finite number >= 0"),
    ("train", "--lam", "x", "a finite number >= 0"),
    ("train", "--seed", "-1", "an integer >= 0"),
    ("prepare", "--shard-size", "0", "an integer >= 1"),
    ("prepare", "--classes", "0", "an integer >= 1"),
    ("prepare", "--resolution", "30", "a multiple of 8"),
]


@pytest.mark.parametrize("command, flag, value, allowed", BAD_NUMBERS)
def test_numeric_flags_are_checked_when_parsed(command, flag, value, allowed, capsys):
    with pytest.raises(SystemExit) as stopped:
        ti.parser().parse_args([command, "--data-dir", "d", "--out", "o", flag, value])
    assert stopped.value.code == 2
    assert f"argument {flag}: '{value}' is not {allowed}" in capsys.readouterr().err


# Train --------------------------------------------------------------------------------------------------------------


def test_batches_are_a_function_of_the_step():
    """Each epoch is a permutation of the rows; the processes' slices make the same global batches for any count."""
    n, batch = 12, 4
    one = [ti.batch_rows(step, 0, 1, n, batch, 0) for step in range(6)]
    assert sorted(torch.cat(one[:3]).tolist()) == list(range(12)) == sorted(torch.cat(one[3:]).tolist())
    assert not torch.equal(torch.cat(one[:3]), torch.cat(one[3:]))  # another order each epoch
    for step in range(6):
        halves = torch.cat([ti.batch_rows(step, rank, 2, n, batch, 0) for rank in (0, 1)])
        assert torch.equal(halves, one[step])
    assert not torch.equal(ti.batch_rows(0, 0, 1, n, batch, 1), one[0])  # the seed decides the order


def weights(folder, step):
    state = load(os.path.join(folder, f"{step:07d}.pt"))
    return state["model"], state["ema"]


# DDP processes: two on the CPU (gloo); on GPUs one per GPU, up to two: with one GPU a single process still runs
# DDP with NCCL for the gradients and gloo for the stop flag (the mixed backend)
PROCESSES = min(2, torch.cuda.device_count()) if CUDA else 2


def ddp_worker(rank, port, argv, sigterm_rank):
    """What torchrun sets up for each process; `sigterm_rank` receives SIGTERM in its first step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(PROCESSES), MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port))
    if rank == sigterm_rank:
        reg.reg_loss = functools.partial(signal_in_first_loss, reg.reg_loss, signal.SIGTERM, [])
    torch.use_deterministic_algorithms(CUDA, warn_only=True)  # as the tests' own process (conftest)
    ti.main(argv)


def ddp_processes(argv, sigterm_rank=-1):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a if a != DEVICE else DEVICE.split(":")[0] for a in argv]  # each process takes cuda:LOCAL_RANK
    # on the CPU forked, not spawned: the children skip importing torch and timm; CUDA cannot be forked once started
    start = "spawn" if CUDA else "fork"
    args = (port, argv, sigterm_rank)
    context = torch.multiprocessing.start_processes(ddp_worker, args, nprocs=PROCESSES, join=False, start_method=start)
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # False until all have ended
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP processes did not finish (waiting for each other?)")


def test_two_processes_equal_one_and_resume_is_exact(root, tmp_path):
    prep = root / "prep"
    micro = ["--micro-batch", "1"]  # 4 micro-batches a step on one process, 2 on each of two (no_sync on the first)
    one = tmp_path / "one"
    train(prep, one, *micro, "--steps", "3", "--log-every", "1")
    log = log_records(one)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["img_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["skipped"] == 0 for r in log)
    two = tmp_path / "two"  # 1 step, then resumed to 3: every process must resume its optimiser too
    for steps in (["--steps", "1"], ["--steps", "3"]):
        ddp_processes(["train", "--data-dir", str(prep), "--out", str(two), *TINY, *micro, *steps, "--log-every", "1"])
    (m1, e1), (m2, e2) = weights(one, 3), weights(two, 3)
    init = reg.make_model("SiT-Ti/2", input_size=4, num_classes=3, encoder_dim=384).state_dict()
    assert any(not torch.allclose(m1[k], init[k]) for k in m1)  # it did train
    for a, b in ((m1, m2), (e1, e2)):
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), "DDP run differs from the one-process run"
    assert [r["loss"] for r in log_records(two)] == pytest.approx([r["loss"] for r in log], rel=1e-5)
    part = tmp_path / "part"  # logs where it saves (steps 1 and 3): the means over each interval
    train(prep, part, *micro, "--steps", "1")
    train(prep, part, *micro, "--steps", "3")
    m3, e3 = weights(part, 3)
    assert all(torch.equal(m1[k], m3[k]) and torch.equal(e1[k], e3[k]) for k in m1), "resume is not exact"
    logged = log_records(part)
    assert [r["step"] for r in logged] == [1, 3]
    for key in LOGGED:
        assert logged[1][key] == pytest.approx((log[1][key] + log[2][key]) / 2, rel=1e-5)


def test_sigterm_to_one_process_stops_both_at_the_next_step(root, tmp_path):
    """torchrun: a SIGTERM that reaches one process only still stops both after the same step, with a checkpoint."""
    run = tmp_path / "run"
    argv = ["train", "--data-dir", str(root / "prep"), "--out", str(run), *TINY, "--steps", "5"]
    ddp_processes(argv, sigterm_rank=PROCESSES - 1)
    assert [os.path.basename(p) for p in reg.checkpoints(str(run))] == ["0000001.pt"]
    assert [r["step"] for r in log_records(run)] == [1]


def test_resume_may_lower_the_lr_but_not_change_the_experiment(root, tmp_path):
    """A run folder with checkpoints continues; a setting that makes the experiment (a loss weight, the data, the
    encoder's weights) may not change, the learning rate may (the advice after a non-finite loss)."""
    run = tmp_path / "run"
    train(root / "prep", run, "--steps", "1")
    with pytest.raises(SystemExit, match=r"beta: checkpoint 0.03, now 0.05"):
        train(root / "prep", run, "--steps", "2", "--beta", "0.05")
    other = tmp_path / "other"  # the same images and classes, other shards: another preparation
    prepare(root, other, "--shard-size", "6")
    with pytest.raises(SystemExit, match=r"data_key: checkpoint '\w+', now '\w+'"):
        train(other, run, "--steps", "2")
    torch.manual_seed(1)
    net = __import__("timm").create_model(ENCODER, pretrained=False)
    torch.save(net.state_dict(), tmp_path / "other_encoder.pth")
    argv = [a if a != "random" else str(tmp_path / "other_encoder.pth") for a in TINY]
    with pytest.raises(SystemExit, match=r"encoder_key: checkpoint '\w+', now '\w+'"):
        ti.main(["train", "--data-dir", str(root / "prep"), "--out", str(run), *argv, "--steps", "2"])
    train(root / "prep", run, "--steps", "2", "--lr", "5e-5")
    assert [g["lr"] for g in load(run / "0000002.pt")["opt"]["param_groups"]] == [5e-5]
    resumed = [r for r in reg.read_log(str(run / "log.jsonl")) if r.get("resumed")]
    assert len(resumed) == 1 and resumed[0]["changed"] == {"lr": [1e-4, 5e-5], "steps": [1, 2]}  # logged
    with pytest.raises(SystemExit, match="past --steps 1"):
        train(root / "prep", run, "--steps", "1")


def test_ctrl_c_finishes_the_step_and_saves(root, tmp_path, monkeypatch):
    calls = []  # SIGINT in the first of the first step's two micro-batches
    monkeypatch.setattr(reg, "reg_loss", functools.partial(signal_in_first_loss, reg.reg_loss, signal.SIGINT, calls))
    train(root / "prep", tmp_path, "--steps", "9", "--log-every", "5")
    assert len(calls) == 2, "the step was not finished, or another one began"
    assert [os.path.basename(p) for p in reg.checkpoints(str(tmp_path))] == ["0000001.pt"]
    assert [r["step"] for r in log_records(tmp_path)] == [1]


def test_nonfinite_loss_stops_without_saving_it(root, tmp_path):
    """lr 1e30: step 1 is finite and saved, step 2's loss is not: the run stops before saving it, naming the fix."""
    with pytest.raises(
        SystemExit, match=r"non-finite .* at step 2, not saved; from .*0000001\.pt run again with a lower --lr"
    ):
        train(root / "prep", tmp_path, "--steps", "5", "--lr", "1e30", "--log-every", "1", "--ckpt-every", "1")
    assert [os.path.basename(p) for p in reg.checkpoints(str(tmp_path))] == ["0000001.pt"]
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "0000001.pt")["model"].values())


def test_fp16_steps_the_scaler_skips_are_counted_not_logged_as_nan(root, tmp_path, monkeypatch):
    """fp16: a step whose scaled gradient overflows is skipped by the GradScaler (which halves its scale). Forced here:
    step 2's loss times 1e4 overflows a scale of 2^120 on the CPU (where the scaler scales fp32 gradients), or on a
    GPU real fp16 gradients at 2^16 (which the other steps' survive). The log counts the skipped step, and its grad
    norm is the mean over the steps that were taken."""
    scale = 2.0**16 if CUDA else 2.0**120
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=scale))
    monkeypatch.setattr(reg, "reg_loss", functools.partial(overflow_in_step_2, reg.reg_loss, []))
    every = tmp_path / "every"
    train(root / "prep", every, "--steps", "6", "--log-every", "1", "--precision", "fp16")
    train(root / "prep", tmp_path / "three", "--steps", "6", "--log-every", "3", "--precision", "fp16")
    steps = log_records(every)
    assert [r["skipped"] for r in steps] == [0, 1, 0, 0, 0, 0] and steps[1]["grad_norm"] == 0
    three = log_records(tmp_path / "three")
    assert [r["skipped"] for r in three] == [1, 0]
    assert three[0]["grad_norm"] == pytest.approx((steps[0]["grad_norm"] + steps[2]["grad_norm"]) / 2, rel=1e-5)
    assert all(np.isfinite(r[key]) for r in steps + three for key in LOGGED)
    state = load(every / "0000006.pt")
    assert state["scaler"]["scale"] == scale / 2  # halved once
    assert all(torch.equal(state["model"][k], v) for k, v in load(tmp_path / "three" / "0000006.pt")["model"].items())


def test_batches_hold_the_stored_crops_and_checkpoints_what_sample_py_reads(root, tmp_path):
    """A batch holds the stored crops, posteriors and labels as they are (the release trains without flips); a
    checkpoint stores the classes, the resolution and the VAE for sample.py."""
    shards, starts, _ = ti.load_prepared(str(root / "prep"), 4)
    assert starts.tolist() == [0, 5, 10, 12]
    rows = torch.tensor([11, 0, 7, 3, 5, 9, 1, 10, 2, 8, 4, 6])
    stored = torch.cat([s["images"] for s in shards])
    mean = torch.cat([s["mean"] for s in shards]).float()
    still = [dict(s, std=torch.zeros_like(s["std"])) for s in shards]  # x = the posterior mean, scaled
    order = rows.sort().values  # the rows come grouped by shard
    host = ti.gather(still, starts, rows, pin=False)
    x, y, images = ti.get_batch(host, torch.device("cpu"))
    assert torch.equal(images, stored[order]) and torch.allclose(x, mean[order] * reg.LATENT_SCALE)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    train(root / "prep", tmp_path, "--steps", "1")
    state = load(tmp_path / "0000001.pt")
    assert state["config"]["num_classes"] == 3 and state["classes"] == ["n00", "n01", "n02"]
    assert state["resolution"] == 32 and state["vae"] == str(root / "vae")


def test_plain_sit_never_loads_an_encoder(root, tmp_path, monkeypatch):
    monkeypatch.setattr(reg, "load_encoder", no_encoder)
    train(root / "prep", tmp_path, "--steps", "1", "--method", "sit")
    assert load(tmp_path / "0000001.pt")["args"]["encoder_key"] is None


def test_two_trainers_on_one_folder_are_refused(root, tmp_path):
    with lock_held_elsewhere(tmp_path):
        with pytest.raises(SystemExit, match="another process is writing"):
            train(root / "prep", tmp_path, "--steps", "1")
    train(root / "prep", tmp_path, "--steps", "1")  # the lock ends with its process


def test_a_training_step_reads_nothing_from_the_device(root, tmp_path, monkeypatch):
    """Between log steps a training step reads no tensor value to the host, so on a GPU the host never waits for the
    device and runs ahead (counted on the CPU by a dispatch mode: conftest.count_host_reads). Steps 1 and 2 do not
    log; step 3 logs and saves (those reads are allowed)."""
    with count_host_reads() as reads:
        snapshots = snapshots_after_each_step(monkeypatch, reads)
        train(root / "prep", tmp_path, "--steps", "3", "--log-every", "3", "--precision", "fp16")
    assert snapshots[1] - snapshots[0] == collections.Counter()  # step 2, whole: data, forward, backward, AdamW, EMA
    assert reads - snapshots[1], "the log step's reads were not seen: is the counter working?"


@pytest.mark.skipif(not CUDA, reason="counts a GPU's waits: pytest --device cuda")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_training_step_never_waits_for_the_gpu(root, tmp_path, monkeypatch, precision):
    """pytest --device cuda: CUDA's sync debug mode reports no wait between the end of step 1 and the end of step 2
    (data, copies to the GPU, forward, backward, clip, AdamW, EMA), with the GradScaler of fp16 too."""
    run = functools.partial(
        train, root / "prep", tmp_path, "--steps", "3", "--log-every", "3", "--precision", precision
    )
    assert cuda_waits_in_step_2(monkeypatch, run) == []


def test_a_killed_run_leaves_no_trace(root, tmp_path):
    """A rerun removes what a killed run left: the log records past the newest checkpoint (here: none, the run was
    killed before its first) and the temporary files of writers that no longer run; a live writer's file stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    reg.log(str(tmp_path), step=88, loss=1.0)  # the killed run's record
    (tmp_path / f"0000100.pt.{dead_pid}.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f"0000100.pt.{os.getppid()}.tmp").write_bytes(b"a live writer's")
    train(root / "prep", tmp_path, "--steps", "2", "--log-every", "1", "--ckpt-every", "1")
    assert [r["step"] for r in reg.read_log(str(tmp_path / "log.jsonl"))] == [1, 2]
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == [f"0000100.pt.{os.getppid()}.tmp"]
    reg.log(str(tmp_path), step=3, loss=1.0)  # killed after logging step 3, before its checkpoint
    train(root / "prep", tmp_path, "--steps", "3", "--log-every", "1", "--ckpt-every", "1")
    assert [r["step"] for r in log_records(tmp_path)] == [1, 2, 3]


def test_a_second_ctrl_c_stops_at_once_in_one_line(root, tmp_path, monkeypatch):
    """The first Ctrl-C in step 1 asks for a checkpoint after the step; a second one while it is written stops at
    once: that checkpoint is not written, nothing half-written is left."""
    calls = []
    monkeypatch.setattr(reg, "reg_loss", functools.partial(signal_in_first_loss, reg.reg_loss, signal.SIGINT, calls))
    monkeypatch.setattr(torch, "save", functools.partial(signal_in_save, torch.save, signal.SIGINT))
    with pytest.raises(SystemExit, match="^stopped at once: run again to continue from the last checkpoint$"):
        train(root / "prep", tmp_path, "--steps", "9")
    assert reg.checkpoints(str(tmp_path)) == [] and not list(tmp_path.glob("*.tmp"))


def test_optimizer_step_without_fp16_steps_adamw_directly():
    """bf16 and fp32 need no GradScaler: None (or a disabled one) and AdamW steps directly; fp16's goes through it."""
    model = torch.nn.Linear(3, 2)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for scaler in (None, torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", init_scale=4.0)):
        before = model.weight.detach().clone()
        (scaler.scale(model(torch.ones(1, 3)).sum()) if scaler else model(torch.ones(1, 3)).sum()).backward()
        grad_norm, skipped = reg.optimizer_step(model, ema, opt, scaler)
        assert not bool(skipped) and grad_norm > 0 and not torch.equal(model.weight, before)

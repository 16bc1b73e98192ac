"""Tests of train_cifar.py on a tiny generated ImageFolder with randomly initialised real timm encoders (CPU, offline)."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import reg
import train_cifar
from tests.conftest import (
    count_host_reads,
    cuda_waits_in_step_2,
    label_width,
    lock_held_elsewhere,
    snapshots_after_each_step,
)

DEVICE = os.environ.get("REG_TEST_DEVICE", "cpu")  # pytest --device cuda
ENC = ["--encoder", "vit_small_patch14_dinov2.lvd142m", "--encoder-weights", "random"]
RANDOM_LITE0 = ["--encoder-weights", "random"]  # the CPU recipe's encoder, untrained (offline)
FD = ["--fd-encoder", "test_efficientnet", "--fd-encoder-weights", "random"]  # a tiny timm CNN, 256 wide: FD is cheap


def make_folder(root, size=8, classes=3, per_class=4, odd=None, seed=0):
    """classes x per_class random PNGs of size x size; `odd` = (class, index, size) makes one image another size."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(root / f"class{c}", exist_ok=True)
        for i in range(per_class):
            s = odd[2] if odd and (c, i) == odd[:2] else size
            Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def args(data, out, *extra, enc=ENC):
    base = ["--data-dir", str(data), "--out", str(out), "--model", "SiT-Ti/2",
            "--batch-size", "4", "--log-every", "1", "--sample-every", "0", "--ckpt-every", "1000", "--device", DEVICE,
            "--holdout", "0", "--recipe", "paper", "--cache-dir", str(out.parent / "cache")]  # fmt: skip
    return train_cifar.parse_args(base + enc + list(extra))


def log(out):
    """The records of a run as reg.read_log gives them (torn lines and steps redone after a resume dropped)."""
    return reg.read_log(str(out / "log.jsonl"))


def losses_of(out):
    return [r for r in log(out) if "loss" in r]


LOSSES = ("loss", "denoise", "denoise_cls", "align", "grad_norm")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


def send_signal_at(monkeypatch, at, signum=signal.SIGINT):
    """Make reg.reg_loss deliver a real signal to this process during its call number `at` (1-based)."""
    calls, loss = [], reg.reg_loss

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        return loss(*a, **k)

    monkeypatch.setattr(reg, "reg_loss", interrupted)
    return calls


def must_not_be_reached(signum, frame):
    raise AssertionError(f"signal {signum} reached the default handler: the script does not handle it")


# --- Part 1: the loop ------------------------------------------------------------------------------------------------


def test_trains_and_writes_checkpoint_samples_log(data, tmp_path):
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "4", "--sample-every", "4"))
    recs = log(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["denoise_cls"] > 0 and r["align"] != 0 for r in recs)  # all 3 REG terms
    ckpt = reg.load_checkpoint(str(out / "0000004.pt"))
    assert ckpt["step"] == 4 and ckpt["config"]["num_classes"] == 3 and ckpt["config"]["input_size"] == 8
    assert ckpt["config"]["encoder_dim"] == 384 and ckpt["args"]["method"] == "reg"
    # reg.save_grid: 8x8 tiles enlarged to 64 px, 4 px gaps, row names left, a 16 px title line
    names = label_width("class0", "class1", "class2")
    assert Image.open(out / "samples_0000004.png").size == (names + 8 * 68, 20 + 3 * 68)  # a row per class
    assert Image.open(out / "strip_0000004.png").size == (names + 8 * 68, 36 + 3 * 68)  # and a line of times
    assert ckpt["args"]["lr"] == 1e-4 and ckpt["args"]["classes"] == ["class0", "class1", "class2"]
    assert all(r["img_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in recs)  # every record is a benchmark
    assert os.path.getsize(out / "losses.png") > 1000
    train_cifar.main(args(data, out, "--steps", "4"))  # the same command again: the run is done, nothing changes
    assert reg.checkpoints(str(out))[-1].endswith("0000004.pt") and len(losses_of(out)) == 4
    with pytest.raises(SystemExit, match="method: checkpoint 'reg', now 'repa'"):  # names the difference
        train_cifar.main(args(data, out, "--steps", "6", "--method", "repa"))


def test_resume_after_ctrl_c_reproduces_uninterrupted_run(data, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"  # 12 images, batch 4: 3 steps an epoch, resume mid-epoch 1
    train_cifar.main(args(data, a, "--steps", "7", "--ckpt-every", "4"))
    with monkeypatch.context() as m:
        send_signal_at(m, 2)  # Ctrl-C in step 2: the step ends, is saved, the run stops
        train_cifar.main(args(data, b, "--steps", "7", "--ckpt-every", "4"))
    assert [os.path.basename(p) for p in reg.checkpoints(str(b))] == ["0000002.pt"]
    train_cifar.main(args(data, b, "--steps", "5"))  # resume twice, once across a checkpoint
    train_cifar.main(args(data, b, "--steps", "7", "--ckpt-every", "4"))
    assert [[r[k] for k in LOSSES] for r in losses_of(a)] == [[r[k] for k in LOSSES] for r in losses_of(b)]
    sa, sb = reg.load_checkpoint(str(a / "0000007.pt")), reg.load_checkpoint(str(b / "0000007.pt"))
    for part in ("model", "ema"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    opt_a, opt_b = sa["opt"]["state"], sb["opt"]["state"]
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])


def test_non_finite_loss_stops_without_saving_it(data, tmp_path, monkeypatch):
    calls, loss = [], reg.reg_loss

    def poisoned(*a, **k):  # the loss turns NaN in step 3, found at the save in step 4
        calls.append(1)
        out = loss(*a, **k)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) >= 3 else out

    monkeypatch.setattr(reg, "reg_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(
        SystemExit, match="non-finite .* at step 4.*0000002.pt run again with a lower --lr"
    ):  # checked at the save
        train_cifar.main(args(data, out, "--steps", "6", "--ckpt-every", "2", "--log-every", "100"))
    assert [os.path.basename(p) for p in reg.checkpoints(str(out))] == ["0000002.pt"]


def test_log_records_the_mean_over_the_interval(data, tmp_path):
    every, pairs = tmp_path / "every", tmp_path / "pairs"
    train_cifar.main(args(data, every, "--steps", "4"))
    train_cifar.main(args(data, pairs, "--steps", "4", "--log-every", "2"))
    one, two = losses_of(every), losses_of(pairs)
    assert [r["step"] for r in two] == [2, 4]
    for k in ("loss", "denoise", "denoise_cls", "align", "grad_norm"):  # logging never changes the training
        assert two[0][k] == pytest.approx((one[0][k] + one[1][k]) / 2, rel=1e-5, abs=1e-6), k
        assert two[1][k] == pytest.approx((one[2][k] + one[3][k]) / 2, rel=1e-5, abs=1e-6), k


def test_feature_cache_matches_live_encoder(data, tmp_path):
    live, cached = tmp_path / "live", tmp_path / "cached"
    train_cifar.main(args(data, live, "--steps", "4"))
    train_cifar.main(args(data, cached, "--steps", "4", "--cache-features", "--cache-dir", str(tmp_path)))
    assert len(list(tmp_path.glob("feats-*.npy"))) == 1
    memmap = np.load(next(tmp_path.glob("feats-*.npy")), mmap_mode="r")  # (2, 12, 1+T, E)
    flip, idx = torch.tensor([1, 0, 1]), torch.tensor([5, 5, 0])
    x = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    on_host = train_cifar.features(train_cifar.Data(None, None, [], 12, cache=memmap), x, idx, flip)
    in_memory = train_cifar.to_device_if_fits(memmap, torch.device(DEVICE), "cache")  # a tensor on a GPU
    assert torch.is_tensor(in_memory) == DEVICE.startswith("cuda")
    on_device = train_cifar.features(
        train_cifar.Data(None, None, [], 12, cache=torch.as_tensor(np.array(in_memory)).to(DEVICE)),
        x.to(DEVICE),
        idx.to(DEVICE),
        flip.to(DEVICE),
    )
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_host, on_device))
    assert torch.equal(on_host[1][0], torch.from_numpy(memmap[1, 5, 1:].astype(np.float32)))
    for r, s in zip(log(live), log(cached)):  # steps 2-4 use other images and flips than step 1
        for k in ("loss", "denoise", "denoise_cls", "align"):
            assert r[k] == pytest.approx(s[k], rel=2e-3, abs=1e-4), (r["step"], k)


def test_sit_needs_no_encoder(data, tmp_path):
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2", "--method", "sit", enc=["--encoder", "no-such-encoder"]))
    assert all(r["denoise_cls"] == 0 and r["align"] == 0 for r in losses_of(out))


def test_unconditional_trains_one_class_and_shows_rows_of_samples(data, tmp_path):
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2", "--unconditional", "--sample-every", "2"))
    assert reg.load_checkpoint(str(out / "0000002.pt"))["config"]["num_classes"] == 1
    assert Image.open(out / "samples_0000002.png").size == (label_width("all") + 8 * 68, 20 + 8 * 68)  # 8 rows "all"


# --- Part 2: caches, resume and bad input ---------------------------------------------------------------------------------------------------


def test_feature_cache_is_keyed_by_content_not_by_size(tmp_path):
    """two datasets of the same size under one --cache-dir each get their own cache; a cache whose stored
    key does not match is refused."""
    first = make_folder(tmp_path / "first", seed=1)
    second = make_folder(tmp_path / "second", seed=2)  # same size, other pixels
    caches = tmp_path / "caches"
    for folder in (first, second):
        train_cifar.main(args(folder, tmp_path / f"cached-{folder.name}", "--steps", "2", "--cache-features",
                              "--cache-dir", str(caches)))  # fmt: skip
    assert len(list(caches.glob("feats-*.npy"))) == 2
    train_cifar.main(args(second, tmp_path / "live", "--steps", "2"))
    for r, s in zip(log(tmp_path / "live"), log(tmp_path / "cached-second")):  # the second run read its own images
        assert r["align"] == pytest.approx(s["align"], rel=2e-3, abs=1e-4)


def test_resume_refuses_other_data(tmp_path):
    """--resume with another --data-dir holding other images of the same size is refused."""
    first = make_folder(tmp_path / "first", seed=1)
    second = make_folder(tmp_path / "second", seed=2)
    out = tmp_path / "run"
    train_cifar.main(args(first, out, "--steps", "1"))
    with pytest.raises(SystemExit, match="data_key"):
        train_cifar.main(args(second, out, "--steps", "2"))
    with pytest.raises(SystemExit, match="holdout: checkpoint 0, now 2"):  # refused before the cache is built
        train_cifar.main(args(first, out, "--steps", "2", "--holdout", "2", "--cache-features"))
    assert not list(tmp_path.glob("cache/feats-*"))
    os.rename(first, tmp_path / "moved")  # the same images in another folder: accepted
    train_cifar.main(args(tmp_path / "moved", out, "--steps", "2"))


BAD_NUMBERS = [("--steps", "0", ">= 1"), ("--steps", "-5", ">= 1"), ("--limit", "-5", ">= 0"),
               ("--batch-size", "-4", ">= 1"), ("--batch-size", "0", ">= 1"), ("--ckpt-every", "0", ">= 1"),
               ("--log-every", "0", ">= 1"), ("--lr", "0", "> 0"), ("--lr", "nan", "> 0"), ("--ema", "1.5", "from 0 to 1"),
               ("--eval-n", "0", ">= 1"), ("--holdout", "-1", ">= 0"), ("--beta", "-1", ">= 0"),
               ("--seeds", "x", ">= 0"), ("--token-dim", "-1", ">= 0")]  # fmt: skip


@pytest.mark.parametrize("flag, value, allowed", BAD_NUMBERS)
def test_bad_numbers_are_refused_at_parse_time_with_the_range(flag, value, allowed, capsys, tmp_path):
    """every numeric flag is checked before anything runs; the error names the flag and the range."""
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--data-dir", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and allowed in err


def test_flag_combinations_are_checked(data, tmp_path, capsys):
    for extra, message in ((["--eval-every", "1", "--eval-n", "3"], ">= 4"), (["--methods", "sit"], "--compare"),
                           (["--eval-every", "1", "--holdout", "0"], "--holdout >= 1"), (["--seeds", "0"], "--compare"),
                           (["--compare", "--fd-encoder", "dinov2-b", "--encoder", "dinov2-b"], "other than --encoder")):  # fmt: skip
        with pytest.raises(SystemExit):
            train_cifar.parse_args(["--data-dir", str(data), "--batch-size", "4"] + extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="leave 10 for training after --holdout 2, fewer than --limit 20"):
        train_cifar.main(args(data, tmp_path / "r", "--limit", "20", "--holdout", "2"))


def test_resume_may_lower_the_learning_rate_but_not_change_the_experiment(data, tmp_path):
    """the NaN advice "lower --lr" works with --resume; beta still makes another experiment."""
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2", "--lr", "1e-3"))
    train_cifar.main(args(data, out, "--steps", "3", "--lr", "2e-4"))
    assert reg.load_checkpoint(str(out / "0000003.pt"))["opt"]["param_groups"][0]["lr"] == 2e-4
    assert [r["changed"]["lr"] for r in log(out) if "resumed" in r] == [[1e-3, 2e-4]]
    other = tmp_path / "other.pth"  # other encoder weights: the content decides, not the path
    torch.save(reg.load_encoder(ENC[1], 4, "random").net.state_dict(), other)
    for flag, value, name in (("--beta", "0.1", "beta"), ("--ema", "0.5", "ema"), ("--holdout", "1", "data_key"),
                              ("--encoder-weights", str(other), "encoder_key")):  # fmt: skip
        with pytest.raises(SystemExit, match=name):
            train_cifar.main(args(data, out, "--steps", "4", "--lr", "2e-4", flag, value))
    with pytest.raises(SystemExit, match="past --steps 2: raise --steps"):  # never a silent no-op
        train_cifar.main(args(data, out, "--steps", "2"))


def test_sigterm_saves_a_checkpoint_and_stops(data, tmp_path, monkeypatch):
    """a scheduler's SIGTERM ends the step, saves and stops (the old script died without saving)."""
    previous = signal.signal(signal.SIGTERM, must_not_be_reached)
    try:
        with monkeypatch.context() as m:
            send_signal_at(m, 3, signal.SIGTERM)
            train_cifar.main(args(data, tmp_path / "run", "--steps", "7"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [os.path.basename(p) for p in reg.checkpoints(str(tmp_path / "run"))] == ["0000003.pt"]
    train_cifar.main(args(data, tmp_path / "run", "--steps", "4"))
    assert [r["step"] for r in losses_of(tmp_path / "run")] == [1, 2, 3, 4]


def test_a_torn_log_line_loses_no_record(data, tmp_path):
    """A kill in mid-write leaves half a line in log.jsonl: the log is append-only, the reader skips the torn line
    wherever it is and keeps the records after it."""
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2"))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5\n')
    train_cifar.main(args(data, out, "--steps", "4"))
    assert [r["step"] for r in losses_of(out)] == [1, 2, 3, 4]


def test_ctrl_c_while_building_the_cache_cleans_up(data, tmp_path, monkeypatch):
    """Ctrl-C in the cache build says how to continue, in one line; the next run removes the partial file."""
    calls, mirror = [], train_cifar.mirror

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return mirror(*a)

    caches = tmp_path / "caches"
    flags = ["--steps", "1", "--cache-features", "--cache-dir", str(caches), "--batch-size", "2"]
    with monkeypatch.context() as m:
        m.setattr(train_cifar, "mirror", interrupted)
        with pytest.raises(SystemExit, match="stopped; what was written is whole: run the same command again"):
            train_cifar.main(args(data, tmp_path / "run", *flags))
    assert len(list(caches.glob("*.tmp"))) == 1 and not list(caches.glob("*.npy"))
    train_cifar.main(args(data, tmp_path / "run", *flags))
    assert not list(caches.glob("*.tmp")) and len(list(caches.glob("*.npy"))) == 1


# --- Part 3: the diagnostics and the comparison ----------------------------------------------------------------


def test_evaluation_logs_fd_halves_bins_and_token_consistency(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=5)  # 15 images: 3 held out, 12 trained on
    out = tmp_path / "run"
    train_cifar.main(args(folder, out, "--steps", "2", "--eval-every", "2", "--eval-n", "6",
                          "--holdout", "3", "--cache-dir", str(tmp_path), *FD))  # fmt: skip
    evals = [r for r in log(out) if "fd" in r]
    assert len(evals) == 1
    e = evals[0]
    assert all(np.isfinite(e[k]) and e[k] > 0 for k in ("fd", "fd_a", "fd_b"))
    assert e["bin_t"] == pytest.approx([(k + 0.5) / 10 for k in range(10)])
    assert len(e["bin_denoise"]) == len(e["bin_denoise_cls"]) == 10 and min(e["bin_denoise_cls"]) > 0
    assert -1 <= e["token_consistency"] <= 1
    assert os.path.getsize(out / "t_bins.png") > 1000


def test_bins_of_a_frozen_ema_are_the_fresh_models_closed_form(tmp_path):
    """--ema 1 keeps the EMA at the initial, zero-output model: every bin's image loss is then mean((eps - x)^2) over
    the held-out batch, about 1 + mean(x^2) for any t; the token's likewise 1 + mean(cls^2)."""
    folder = make_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    train_cifar.main(args(folder, out, "--steps", "1", "--eval-every", "1", "--eval-n", "4",
                          "--holdout", "6", "--ema", "1", "--cache-dir", str(tmp_path), *FD))  # fmt: skip
    e = [r for r in log(out) if "fd" in r][0]
    parsed = args(folder, out, "--holdout", "6")
    data = train_cifar.load_data(parsed, train_cifar.open_dataset(parsed), torch.device("cpu"))
    held = data.images[data.n_train :].float() / 127.5 - 1
    assert e["bin_denoise"] == pytest.approx([1 + held.pow(2).mean().item()] * 10, rel=0.1)
    assert max(e["bin_denoise"]) - min(e["bin_denoise"]) < 1e-6  # the same noise in every bin, v_hat = 0
    torch.manual_seed(parsed.seed)  # as train_cifar seeds the 'random' encoder
    cls = reg.load_encoder(ENC[1], 4, "random")(data.images[data.n_train :])[0]
    assert e["bin_denoise_cls"] == pytest.approx([1 + cls.pow(2).mean().item()] * 10, rel=0.1)


def test_held_out_images_are_never_trained_on(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "data", per_class=5)
    seen, loss = [], reg.reg_loss

    def recorded(model, x, *a, **k):
        seen.append(x.clone())
        return loss(model, x, *a, **k)

    monkeypatch.setattr(reg, "reg_loss", recorded)
    parsed = args(folder, tmp_path / "run", "--steps", "9", "--holdout", "3")  # 3 epochs of the 12 training images
    train_cifar.main(parsed)
    data = train_cifar.load_data(parsed, train_cifar.open_dataset(parsed), torch.device("cpu"))
    pixels = data.images.float() / 127.5 - 1
    both_flips = torch.cat([pixels, pixels.flip(-1)]).flatten(1)  # (2 (N + 3), 3 H W)
    index = torch.arange(len(pixels)).repeat(2)
    trained = torch.cat(seen).flatten(1)
    matches = (trained[:, None] - both_flips[None]).abs().amax(-1) < 1e-6  # (steps x B, 2 (N + 3))
    which = [index[m.nonzero()[0]].item() for m in matches]  # every trained image is one of the folder's
    assert set(which) == set(range(data.n_train)) and data.n_train == 12 and len(data.images) == 15


def test_compare_trains_every_method_and_seed_and_writes_the_table(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=5)
    out = tmp_path / "cmp"
    flags = ["--compare", "--data-dir", str(folder), "--out", str(out), "--model", "SiT-Ti/2", "--batch-size", "4",
             "--steps", "2", "--eval-every", "1", "--eval-n", "4", "--sample-every", "2", "--holdout", "3", "--limit",
             "0", "--log-every", "1", "--device", DEVICE, "--cache-dir", str(tmp_path), "--unconditional",
             "--token-dim", "4", "--seeds", "0", *ENC, *FD]  # fmt: skip
    train_cifar.main(train_cifar.parse_args(flags))
    assert os.path.getsize(out / "compare.png") > 1000
    assert "| seed | sit | repa | reg |" in (out / "compare.md").read_text()
    for method in ("sit", "repa", "reg"):
        evals = [r for r in log(out / f"{method}-seed0") if "fd" in r]
        assert [r["step"] for r in evals] == [1, 2] and all(len(r["bin_denoise"]) == 10 for r in evals)
        settings = reg.load_checkpoint(str(out / f"{method}-seed0" / "0000002.pt"))["args"]
        assert (settings["method"], settings["steps"], settings["unconditional"]) == (method, 2, True)
        assert settings["token_dim"] == (4 if method == "reg" else 0)  # no token, no token_dim stored
    assert len(list(tmp_path.glob("feats-*.npy"))) == 1  # repa and reg share one feature cache
    settings = train_cifar.parse_args(["--compare", "--data-dir", "x", "--steps", "7"])  # its defaults; flags win
    assert (settings.model, settings.batch_size, settings.steps, settings.seeds) == ("SiT-S/2", 256, 7, [0, 1, 2, 3])
    assert settings.token_dim <= reg.PRESETS["SiT-S/2"]["hidden_size"]  # the token fits through the model
    assert settings.fd_encoder != settings.encoder  # the judge is not the alignment encoder


def test_compare_pairs_seeds_in_its_table(tmp_path, monkeypatch):
    """Each method's difference to sit, seed by seed: the mean, the spread, and in how many seeds it is lower."""
    arms = []
    fd = {("sit", 0): 10.0, ("sit", 1): 11.0, ("reg", 0): 9.0, ("reg", 1): 11.5}
    loss = {"sit": 1.0, "reg": 0.9}

    def fake_train(arm):  # what compare hands to each run, and a log with an evaluation; Ctrl-C in the 3rd run
        arms.append((arm.method, arm.seed, os.path.relpath(arm.out, tmp_path)))
        os.makedirs(arm.out, exist_ok=True)
        record = dict(step=2, fd=fd[arm.method, arm.seed], bin_t=[0.25, 0.75], bin_denoise=[loss[arm.method]] * 2)
        (Path(arm.out) / "log.jsonl").write_text(json.dumps(record) + "\n")
        return arm.out, len(arms) == 3 and stop_in_third

    monkeypatch.setattr(train_cifar, "train", fake_train)
    stop_in_third = False
    flags = ["--compare", "--seeds", "0", "1", "--methods", "sit", "reg", "--data-dir", "x"]
    train_cifar.main(train_cifar.parse_args([*flags, "--out", str(tmp_path)]))
    assert arms == [(m, s, f"{m}-seed{s}") for s in (0, 1) for m in ("sit", "reg")]
    table = (tmp_path / "compare.md").read_text()
    assert "| 0 | 10.00 | 9.00 (-1.00) |" in table and "| 1 | 11.00 | 11.50 (+0.50) |" in table
    assert "| minus sit (of 2 seeds) | - | -0.25 +- 0.75, lower in 1 |" in table
    assert "| 0.25 | 1.0000 | -10.0% (2) |" in table
    assert os.path.getsize(tmp_path / "compare.png") > 1000
    arms.clear()
    stop_in_third = True
    train_cifar.main(train_cifar.parse_args([*flags, "--out", str(tmp_path / "stopped")]))
    assert len(arms) == 3 and not (tmp_path / "stopped" / "compare.png").exists()  # Ctrl-C stops the comparison


def test_bad_input_gives_clear_errors(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "1"))
    (out / "0000001.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(SystemExit, match="no readable checkpoint"):
        train_cifar.main(args(data, out, "--steps", "2"))
    mixed = make_folder(tmp_path / "mixed", odd=(1, 2, 16))
    with pytest.raises(SystemExit, match="sizes.*16, 16.* one square size"):
        train_cifar.main(args(mixed, tmp_path / "r2", "--steps", "1"))
    make_folder(tmp_path / "split" / "train")  # the CIFAR tarball's layout, one level too high
    with pytest.raises(SystemExit, match="split: Found no valid file for the classes train.*one folder per class"):
        train_cifar.main(args(tmp_path / "split", tmp_path / "r6", "--steps", "1"))
    broken = make_folder(tmp_path / "broken")
    (broken / "class1" / "3.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="class1/3.png"):
        train_cifar.main(args(broken, tmp_path / "r7", "--steps", "1"))
    odd = make_folder(tmp_path / "odd", size=9)
    with pytest.raises(SystemExit, match="not a multiple of patch_size"):
        train_cifar.main(args(odd, tmp_path / "r3", "--steps", "1"))
    with pytest.raises(SystemExit, match="--encoder-weights"):  # offline hub -> names the fix
        train_cifar.main(args(data, tmp_path / "r4", "--steps", "1", enc=["--encoder", "dinov2-s"]))
    with pytest.raises(SystemExit, match="12 images leave 0 for training after --holdout 256"):  # the default
        train_cifar.main(
            train_cifar.parse_args(["--data-dir", str(data), "--device", "cpu", "--out", str(out), *RANDOM_LITE0])
        )

    def offline(*a, **k):  # as torchvision fails without a network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(train_cifar, "CIFAR10", offline)
    with pytest.raises(SystemExit, match="ImageFolder"):  # no data, no network: says what to put there
        train_cifar.main(args(tmp_path / "nothing", tmp_path / "r5", "--steps", "1"))


# --- a token that fits, one trainer per folder, images read by content ---------------------------------------------


def test_token_dim_projects_the_token_and_resumes_with_the_same_directions(data, tmp_path):
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2", "--token-dim", "8", "--cache-features", "--cache-dir",
                          str(tmp_path)))  # fmt: skip
    first = reg.load_checkpoint(str(out / "0000002.pt"))
    basis = first["ema"]["token_basis"]  # (E, K): stored with the model
    assert basis.shape == (384, 8) and first["config"]["token_dim"] == 8
    torch.testing.assert_close(basis.T @ basis, torch.eye(8), atol=1e-4, rtol=0)
    assert torch.equal(first["model"]["token_basis"], basis)
    train_cifar.main(args(data, out, "--steps", "3", "--token-dim", "8", "--cache-features", "--cache-dir",
                          str(tmp_path)))  # fmt: skip
    assert torch.equal(reg.load_checkpoint(str(out / "0000003.pt"))["ema"]["token_basis"], basis)
    model = reg.load_model(str(out / "0000003.pt"))  # what sample.py reads: the token on the same 8 directions
    assert model.cfg.token_width == 8 and torch.equal(model.token_basis, basis)
    assert all(r["denoise_cls"] > 0 for r in losses_of(out))


def test_two_trainers_on_one_folder_are_refused(data, tmp_path):
    out = tmp_path / "run"
    with lock_held_elsewhere(out):
        with pytest.raises(SystemExit, match="another process is writing to"):
            train_cifar.main(args(data, out, "--steps", "1"))
    train_cifar.main(args(data, out, "--steps", "1"))  # the lock ends with its process, kill -9 included


def test_images_are_read_by_content(tmp_path, monkeypatch):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "0.png")
    with pytest.raises(SystemExit, match="any class folder.*Put the images in one folder per class"):
        train_cifar.main(args(flat, tmp_path / "r1", "--steps", "1"))
    make_folder(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    train_cifar.main(args("./tiny", tmp_path / "r0", "--steps", "1"))  # a relative path is a folder like any other
    deep = make_folder(tmp_path / "deep")
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(deep / "class0" / "0.png")  # 16-bit grey, half bright
    assert reg.read_image(str(deep / "class0" / "0.png")).tolist() == np.full((8, 8, 3), 128).tolist()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(deep / "class1" / "9.jpg")
    data = (deep / "class1" / "9.jpg").read_bytes()
    (deep / "class1" / "9.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    with pytest.raises(SystemExit, match="class1/9.jpg cannot be read"):
        train_cifar.main(args(deep, tmp_path / "r2", "--steps", "1"))


def test_kill_9_then_the_same_command_continues_exactly(data, tmp_path):
    """A kill -9 (no handler runs) mid-run: the checkpoints on disk are whole (written atomically), and running the
    same command again continues from the newest to the same weights as an uninterrupted run."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    flags = ["--steps", "8", "--ckpt-every", "2"]
    train_cifar.main(args(data, whole, *flags))
    argv = [str(a) for a in ["--data-dir", data, "--out", killed, "--model", "SiT-Ti/2", "--batch-size", "4",
                             "--log-every", "1", "--sample-every", "0", "--device", DEVICE, "--holdout", "0", *ENC,
                             "--steps", "1000", "--ckpt-every", "2"]]  # fmt: skip
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")  # as this process: the same float sums
    runner = subprocess.Popen([sys.executable, "train_cifar.py", *argv], cwd=Path(__file__).parent.parent,
                              env=one_thread, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not (killed / "0000004.pt").exists() and runner.poll() is None:
            time.sleep(0.05)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    train_cifar.main(args(data, killed, *flags))  # resumed from 0000004.pt or later, whatever was whole
    a, b = reg.load_checkpoint(str(whole / "0000008.pt")), reg.load_checkpoint(str(killed / "0000008.pt"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_a_training_step_reads_nothing_from_the_device(data, tmp_path, monkeypatch):
    """Between log steps a training step (batch, live encoder, loss, backward, clip, AdamW, EMA) reads no tensor value
    to the host, so on a GPU the host runs ahead (counted by a dispatch mode: conftest.count_host_reads). Step 2
    neither logs nor saves. On a CPU, PyTorch's unfused AdamW reads its step counters (a GPU run uses the fused one)."""
    with count_host_reads() as reads:
        snapshots = snapshots_after_each_step(monkeypatch, reads)
        train_cifar.main(args(data, tmp_path / "run", "--steps", "3", "--log-every", "3"))
    step_2 = snapshots[1] - snapshots[0]
    assert [where for where in step_2 if DEVICE != "cpu" or "optimizer_step" not in where] == []


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="counts CUDA waits: pytest --device cuda")
@pytest.mark.parametrize("cached", [False, True])
def test_a_training_step_never_waits_for_the_gpu(data, tmp_path, monkeypatch, cached):
    """pytest --device cuda: CUDA's sync debug mode reports no wait in step 2 (the batch, the encoder or the cache on
    the GPU, forward, backward, clip, AdamW, EMA)."""
    cache = ["--cache-features"] if cached else []
    run = functools.partial(train_cifar.main, args(data, tmp_path / "run", "--steps", "3", "--log-every", "3", *cache))
    assert cuda_waits_in_step_2(monkeypatch, run) == []


@pytest.mark.skipif(DEVICE != "cpu", reason="the memory check is the CPU's (a GPU's own error says out of memory)")
def test_a_run_too_big_for_the_memory_is_refused_before_reading_the_data(data, tmp_path, monkeypatch):
    def one_gib(name):  # os.sysconf of a machine with 1 GiB: 2^18 pages of 4 KiB
        return 4096 if name == "SC_PAGE_SIZE" else 2**18

    monkeypatch.setattr(train_cifar.os, "sysconf", one_gib)  # 8 px images: SiT-B/2 weights and steps, 4 GiB
    read = []
    monkeypatch.setattr(train_cifar, "load_data", lambda *a: read.append(1))
    with pytest.raises(SystemExit, match="SiT-B/2 at --batch-size 128 needs about 4 GiB, this machine has 1: lower"):
        train_cifar.main(args(data, tmp_path / "run", "--model", "SiT-B/2", "--batch-size", "128", "--steps", "1"))
    assert read == []

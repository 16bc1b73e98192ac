"""Tests of train_cifar.py on a tiny generated ImageFolder with randomly initialised real timm encoders (CPU, offline)."""

import json
import os
import signal
import urllib.error
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import reg
import train_cifar

ENC = ["--encoder", "vit_small_patch14_dinov2.lvd142m", "--encoder-weights", "random"]
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
    base = ["--data-dir", str(data), "--out", str(out), "--model", "SiT-Ti/2", "--projector-dim", "64",
            "--batch-size", "4", "--log-every", "1", "--sample-every", "0", "--ckpt-every", "1000", "--device", "cpu",
            "--holdout", "0"]  # fmt: skip
    return train_cifar.parse_args(base + enc + list(extra))


def log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def losses_of(out):
    return [r for r in log(out) if "loss" in r]


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
    train_cifar.main(args(data, out, "--steps", "4", "--sample-every", "4", "--sample-steps", "2"))
    recs = log(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["denoise_cls"] > 0 and r["align"] != 0 for r in recs)  # all 3 REG terms
    ckpt = reg.load_checkpoint(str(out / "0000004.pt"))
    assert ckpt["step"] == 4 and ckpt["config"]["num_classes"] == 3 and ckpt["config"]["input_size"] == 8
    assert ckpt["config"]["encoder_dim"] == 384 and ckpt["args"]["method"] == "reg"
    img = Image.open(out / "samples_0000004.png")
    assert img.size == (8 * 10 + 2, 3 * 10 + 2)  # 3 rows (classes) x 8 columns of 8x8 samples, 2px padding
    strip = Image.open(out / "strip_0000004.png")
    assert strip.size == (8 * 10 + 2, 3 * 10 + 2)  # a row per class x 8 times along the sampler's path
    settings = json.load(open(out / "args.json"))
    assert settings["steps"] == 4 and settings["micro_batch"] == 4 and settings["sampler"] == "euler"
    assert os.path.getsize(out / "losses.png") > 1000
    with pytest.raises(SystemExit, match="--resume"):  # never overwrite a run that holds checkpoints
        train_cifar.main(args(data, out, "--steps", "4"))
    with pytest.raises(SystemExit, match="--method"):  # resume under another method names the difference
        train_cifar.main(args(data, out, "--steps", "6", "--method", "repa", "--resume"))


def test_resume_after_ctrl_c_reproduces_uninterrupted_run(data, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"  # 12 images, batch 4: 3 steps an epoch, resume mid-epoch 1
    train_cifar.main(args(data, a, "--steps", "7", "--ckpt-every", "4"))
    with monkeypatch.context() as m:
        send_signal_at(m, 2)  # Ctrl-C in step 2: the step ends, is saved, the run stops
        train_cifar.main(args(data, b, "--steps", "7", "--ckpt-every", "4"))
    assert [os.path.basename(p) for p in reg.list_checkpoints(str(b))] == ["0000002.pt"]
    train_cifar.main(args(data, b, "--steps", "5", "--resume"))  # resume twice, once across a checkpoint
    train_cifar.main(args(data, b, "--steps", "7", "--ckpt-every", "4", "--resume"))
    assert log(a) == [{**r, "img_per_s": log(a)[i]["img_per_s"]} for i, r in enumerate(log(b))]
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
    with pytest.raises(SystemExit, match="non-finite values at step 4.*0000002.pt.*lower --lr"):
        train_cifar.main(args(data, out, "--steps", "6", "--ckpt-every", "2", "--log-every", "100"))
    assert [os.path.basename(p) for p in reg.list_checkpoints(str(out))] == ["0000002.pt"]


def test_log_records_the_mean_over_the_interval(data, tmp_path):
    every, pairs = tmp_path / "every", tmp_path / "pairs"
    train_cifar.main(args(data, every, "--steps", "4"))
    train_cifar.main(args(data, pairs, "--steps", "4", "--log-every", "2"))
    one, two = losses_of(every), losses_of(pairs)
    assert [r["step"] for r in two] == [2, 4]
    for k in ("loss", "denoise", "denoise_cls", "align", "grad_norm"):  # logging never changes the training
        assert two[0][k] == pytest.approx((one[0][k] + one[1][k]) / 2, rel=1e-5, abs=1e-6), k
        assert two[1][k] == pytest.approx((one[2][k] + one[3][k]) / 2, rel=1e-5, abs=1e-6), k


def test_micro_batches_accumulate_to_the_batch(data, tmp_path, monkeypatch):
    sizes, loss = [], reg.reg_loss

    def counted(model, x, *a, **k):
        sizes.append(len(x))
        return loss(model, x, *a, **k)

    monkeypatch.setattr(reg, "reg_loss", counted)
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2", "--micro-batch", "2"))
    assert sizes == [2, 2, 2, 2]  # two passes of 2 per step of 4
    assert all(np.isfinite(r["loss"]) for r in losses_of(out))
    with pytest.raises(SystemExit):  # 3 does not divide 4
        args(data, out, "--micro-batch", "3")


def test_feature_cache_matches_live_encoder(data, tmp_path):
    live, cached = tmp_path / "live", tmp_path / "cached"
    train_cifar.main(args(data, live, "--steps", "4"))
    train_cifar.main(args(data, cached, "--steps", "4", "--cache-features", "--cache-dir", str(tmp_path)))
    assert len(list(tmp_path.glob("feats-*.npy"))) == 1 and len(list(tmp_path.glob("feats-*.json"))) == 1
    memmap = np.load(next(tmp_path.glob("feats-*.npy")), mmap_mode="r")  # (2, 12, 1+T, E)
    flip, idx = torch.tensor([1, 0, 1]), torch.tensor([5, 5, 0])
    on_host = train_cifar.read_cache(memmap, flip, idx, "cpu")
    in_memory = train_cifar.read_cache(torch.from_numpy(np.array(memmap)), flip, idx, "cpu")  # the GPU-resident path
    assert all(torch.equal(a, b) for a, b in zip(on_host, in_memory))
    assert torch.equal(on_host[1][0], torch.from_numpy(memmap[1, 5, 1:].astype(np.float32)))
    for r, s in zip(log(live), log(cached)):  # steps 2-4 use other images and flips than step 1
        for k in ("loss", "denoise", "denoise_cls", "align"):
            assert r[k] == pytest.approx(s[k], rel=2e-3, abs=1e-4), (r["step"], k)


def test_sit_needs_no_encoder_and_bench_reports(data, tmp_path):
    res = train_cifar.main(train_cifar.parse_args(["--data-dir", str(data), "--model", "SiT-Ti/2", "--method", "sit",
                                                   "--encoder", "no-such-encoder", "--batch-size", "4", "--bench", "2",
                                                   "--warmup", "1", "--device", "cpu", "--holdout", "0"]))  # fmt: skip
    assert res["images_per_s"] > 0 and res["ms_fwd_bwd"] > 0 and res["ms_data"] > 0 and res["tflops"] > 0


def test_unconditional_trains_one_class_and_shows_rows_of_samples(data, tmp_path):
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2", "--unconditional", "--sample-every", "2", "--sample-steps", "2"))
    assert reg.load_checkpoint(str(out / "0000002.pt"))["config"]["num_classes"] == 1
    assert Image.open(out / "samples_0000002.png").size == (8 * 10 + 2, 8 * 10 + 2)  # 8 rows of label 0


# --- Part 2: issue 11 ---------------------------------------------------------------------------------------------------


def test_feature_cache_is_keyed_by_content_not_by_size(tmp_path):
    """Issue 11 (1): two datasets of the same size under one --cache-dir each get their own cache; a cache whose stored
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
    for meta in caches.glob("feats-*.json"):  # a cache copied over another's name
        meta.write_text(json.dumps(dict(json.loads(meta.read_text()), key="0123456789abcdef")))
    with pytest.raises(SystemExit, match="does not belong to these images"):
        train_cifar.main(args(first, tmp_path / "r", "--steps", "1", "--cache-features", "--cache-dir", str(caches)))


def test_resume_refuses_other_data(tmp_path):
    """Issue 11 (1): --resume with another --data-dir holding other images of the same size is refused."""
    first = make_folder(tmp_path / "first", seed=1)
    second = make_folder(tmp_path / "second", seed=2)
    out = tmp_path / "run"
    train_cifar.main(args(first, out, "--steps", "1"))
    with pytest.raises(SystemExit, match="data-fingerprint"):
        train_cifar.main(args(second, out, "--steps", "2", "--resume"))
    os.rename(first, tmp_path / "moved")  # the same images in another folder: accepted
    train_cifar.main(args(tmp_path / "moved", out, "--steps", "2", "--resume"))


BAD_NUMBERS = [("--keep", "-1", ">= 0"), ("--steps", "0", ">= 1"), ("--steps", "-5", ">= 1"), ("--limit", "-5", ">= 0"),
               ("--batch-size", "-4", ">= 1"), ("--batch-size", "0", ">= 1"), ("--ckpt-every", "0", ">= 1"),
               ("--log-every", "0", ">= 1"), ("--lr", "0", "> 0"), ("--lr", "nan", "> 0"), ("--ema", "1.5", "from 0 to 1"),
               ("--eval-n", "0", ">= 1"), ("--holdout", "-1", ">= 0"), ("--beta", "-1", ">= 0"),
               ("--sample-steps", "0", ">= 1"), ("--seeds", "0,x", "comma-separated")]  # fmt: skip


@pytest.mark.parametrize("flag, value, allowed", BAD_NUMBERS)
def test_bad_numbers_are_refused_at_parse_time_with_the_range(flag, value, allowed, capsys, tmp_path):
    """Issue 11 (3): every numeric flag is checked before anything runs; the error names the flag and the range."""
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--data-dir", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and allowed in err


def test_flag_combinations_are_checked(data, tmp_path, capsys):
    for extra, message in ((["--micro-batch", "3"], "must divide"), (["--eval-every", "1", "--eval-n", "3"], "at least 4"),
                           (["--eval-every", "1", "--holdout", "0"], "--holdout >= 1"),
                           (["--seeds", "0,1"], "--compare")):  # fmt: skip
        with pytest.raises(SystemExit):
            train_cifar.parse_args(["--data-dir", str(data), "--batch-size", "4"] + extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--limit 20 exceeds the 10 images left after --holdout 2"):
        train_cifar.main(args(data, tmp_path / "r", "--limit", "20", "--holdout", "2"))


def test_resume_may_lower_the_learning_rate_but_not_change_the_experiment(data, tmp_path):
    """Issue 11 (4): the NaN advice "lower --lr" works with --resume; beta still makes another experiment."""
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2", "--lr", "1e-3"))
    train_cifar.main(args(data, out, "--steps", "3", "--lr", "2e-4", "--resume"))
    assert reg.load_checkpoint(str(out / "0000003.pt"))["opt"]["param_groups"][0]["lr"] == 2e-4
    assert [r["note"] for r in log(out) if "note" in r] == ["--lr changed from 0.001 to 0.0002"]
    with pytest.raises(SystemExit, match="--beta"):
        train_cifar.main(args(data, out, "--steps", "4", "--lr", "2e-4", "--beta", "0.1", "--resume"))


def test_sigterm_saves_a_checkpoint_and_stops(data, tmp_path, monkeypatch):
    """Issue 11 (5): a scheduler's SIGTERM ends the step, saves and stops (the old script died without saving)."""
    previous = signal.signal(signal.SIGTERM, must_not_be_reached)
    try:
        with monkeypatch.context() as m:
            send_signal_at(m, 3, signal.SIGTERM)
            train_cifar.main(args(data, tmp_path / "run", "--steps", "7"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [os.path.basename(p) for p in reg.list_checkpoints(str(tmp_path / "run"))] == ["0000003.pt"]
    train_cifar.main(args(data, tmp_path / "run", "--steps", "4", "--resume"))
    assert [r["step"] for r in losses_of(tmp_path / "run")] == [1, 2, 3, 4]


def test_torn_last_log_line_does_not_block_resume(data, tmp_path):
    """Issue 11 (5): a kill in mid-write leaves half a line in log.jsonl; --resume drops it."""
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "2"))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5')
    train_cifar.main(args(data, out, "--steps", "3", "--resume"))
    assert [r["step"] for r in log(out)] == [1, 2, 3]


def test_ctrl_c_while_building_the_cache_cleans_up(data, tmp_path, monkeypatch):
    """Issue 11 (5): Ctrl-C in the cache build leaves no .npy.tmp and says how to continue, not a traceback."""
    calls, to_pixels = [], train_cifar.to_pixels

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return to_pixels(*a)

    monkeypatch.setattr(train_cifar, "to_pixels", interrupted)
    caches = tmp_path / "caches"
    with pytest.raises(SystemExit, match="partial file was removed: run the same command again"):
        train_cifar.main(args(data, tmp_path / "run", "--steps", "1", "--cache-features", "--cache-dir", str(caches),
                              "--batch-size", "2"))  # fmt: skip
    assert not list(caches.glob("*.tmp")) and not list(caches.glob("*.npy"))


# --- Part 3: the diagnostics and the comparison (issue 10) ----------------------------------------------------------


def test_evaluation_logs_fd_halves_bins_token_landing_strip_and_npz(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=5)  # 15 images: 3 held out, 12 trained on
    out = tmp_path / "run"
    train_cifar.main(args(folder, out, "--steps", "2", "--eval-every", "2", "--eval-n", "6", "--sample-steps", "2",
                          "--holdout", "3", "--cache-dir", str(tmp_path), "--save-npz", *FD))  # fmt: skip
    evals = [r for r in log(out) if "fd" in r]
    assert len(evals) == 1
    e = evals[0]
    assert all(np.isfinite(e[k]) and e[k] > 0 for k in ("fd", "fd_a", "fd_b"))
    assert e["bin_t"] == pytest.approx([(k + 0.5) / 10 for k in range(10)])
    assert len(e["bin_denoise"]) == len(e["bin_denoise_cls"]) == 10 and min(e["bin_denoise_cls"]) > 0
    assert 0 <= e["token_match"] <= 1 and -1 <= e["token_cos"] <= 1 and -1 <= e["token_consistency"] <= 1
    assert np.load(out / "samples_0000002.npz")["arr_0"].shape == (6, 8, 8, 3)
    assert len(list(tmp_path.glob("stats-*.pt"))) == 1
    assert os.path.getsize(out / "t_bins.png") > 1000


def test_bins_of_a_frozen_ema_are_the_fresh_models_closed_form(tmp_path):
    """--ema 1 keeps the EMA at the initial, zero-output model: every bin's image loss is then mean((eps - x)^2) over
    the held-out batch, about 1 + mean(x^2) for any t; the token's likewise 1 + mean(cls^2)."""
    folder = make_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    train_cifar.main(args(folder, out, "--steps", "1", "--eval-every", "1", "--eval-n", "4", "--sample-steps", "1",
                          "--holdout", "6", "--ema", "1", "--cache-dir", str(tmp_path), *FD))  # fmt: skip
    e = [r for r in log(out) if "fd" in r][0]
    parsed = args(folder, out, "--holdout", "6")
    data = train_cifar.load_data(parsed, torch.device("cpu"))
    held = data.images[data.n_train :].float() / 127.5 - 1
    assert e["bin_denoise"] == pytest.approx([1 + held.pow(2).mean().item()] * 10, rel=0.1)
    assert max(e["bin_denoise"]) - min(e["bin_denoise"]) < 1e-6  # the same noise in every bin, v_hat = 0
    encoder = train_cifar.load_encoder_seeded(ENC[1], 4, "random", "cpu", "", parsed.seed)
    cls = encoder(held)[0]
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
    data = train_cifar.load_data(parsed, torch.device("cpu"))
    pixels = data.images.float() / 127.5 - 1
    both_flips = torch.cat([pixels, pixels.flip(-1)]).flatten(1)  # (2 (N + 3), 3 H W)
    index = torch.arange(len(pixels)).repeat(2)
    trained = torch.cat(seen).flatten(1)
    matches = (trained[:, None] - both_flips[None]).abs().amax(-1) < 1e-6  # (steps x B, 2 (N + 3))
    which = [index[m.nonzero()[0]].item() for m in matches]  # every trained image is one of the folder's
    assert set(which) == set(range(data.n_train)) and data.n_train == 12 and len(data.images) == 15


def test_compare_trains_three_arms_and_draws_one_png(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=5)
    out = tmp_path / "cmp"
    train_cifar.main(train_cifar.parse_args([
        "--compare", "--data-dir", str(folder), "--out", str(out), "--model", "SiT-Ti/2", "--projector-dim", "64",
        "--batch-size", "4", "--steps", "2", "--eval-every", "1", "--eval-n", "4", "--sample-every", "2",
        "--sample-steps", "2", "--holdout", "3", "--limit", "0", "--log-every", "1", "--device", "cpu",
        "--cache-dir", str(tmp_path), "--unconditional", *ENC, *FD]))  # fmt: skip
    assert os.path.getsize(out / "compare.png") > 1000
    for method in ("sit", "repa", "reg"):
        evals = [r for r in log(out / method) if "fd" in r]
        assert [r["step"] for r in evals] == [1, 2] and all(len(r["bin_denoise"]) == 10 for r in evals)
        assert (out / method / "strip_0000002.png").exists()
        settings = json.load(open(out / method / "args.json"))
        assert (settings["method"], settings["steps"], settings["seed"], settings["unconditional"]) == (
            method,
            2,
            0,
            True,
        )
    assert len(list(tmp_path.glob("feats-*.npy"))) == 1  # repa and reg share one feature cache
    settings = train_cifar.parse_args(["--compare", "--data-dir", "x", "--steps", "7"])  # its defaults; flags win
    assert (settings.model, settings.batch_size, settings.steps, settings.eval_every) == ("SiT-S/2", 256, 7, 500)


def test_compare_runs_each_method_for_each_seed(tmp_path, monkeypatch):
    arms = []

    def fake_train(arm):  # what compare hands to each run, and a log with an evaluation
        arms.append((arm.method, arm.seed, os.path.relpath(arm.out, tmp_path), arm.compare))
        os.makedirs(arm.out)
        record = dict(step=1, fd=1.0, fd_a=1.5, fd_b=1.4, bin_t=[0.5], bin_denoise=[1.0], bin_denoise_cls=[0.0])
        (Path(arm.out) / "log.jsonl").write_text(json.dumps(record) + "\n")

    monkeypatch.setattr(train_cifar, "train", fake_train)
    train_cifar.main(train_cifar.parse_args(["--compare", "--seeds", "0,1", "--out", str(tmp_path), "--data-dir", "x"]))
    assert arms == [(m, s, f"{m}-seed{s}", False) for s in (0, 1) for m in ("sit", "repa", "reg")]
    assert os.path.getsize(tmp_path / "compare.png") > 1000


def test_bad_input_gives_clear_errors(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_cifar.main(args(data, out, "--steps", "1"))
    (out / "0000001.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(SystemExit, match="corrupt"):
        train_cifar.main(args(data, out, "--steps", "2", "--resume"))
    mixed = make_folder(tmp_path / "mixed", odd=(1, 2, 16))
    with pytest.raises(SystemExit, match="differ in size.*16x16"):
        train_cifar.main(args(mixed, tmp_path / "r2", "--steps", "1"))
    make_folder(tmp_path / "split" / "train")  # the CIFAR tarball's layout, one level too high
    with pytest.raises(SystemExit, match="directly in one folder per class.*split/train"):
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
    with pytest.raises(SystemExit, match="--holdout 256 leaves none of the 12 images"):  # the default hold-out
        train_cifar.main(train_cifar.parse_args(["--data-dir", str(data), "--device", "cpu", "--out", str(out)]))

    def offline(*a, **k):  # as torchvision fails without a network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(train_cifar, "CIFAR10", offline)
    with pytest.raises(SystemExit, match="ImageFolder"):  # no data, no network: says what to put there
        train_cifar.main(args(tmp_path / "nothing", tmp_path / "r5", "--steps", "1"))

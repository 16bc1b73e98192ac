"""Tests of train_cifar.py on a tiny generated ImageFolder with randomly initialised real timm encoders (CPU, offline)."""
import json
import os
import signal
import urllib.error

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np
import pytest
import torch
from PIL import Image

import reg
import train_cifar

ENC = ['--encoder', 'vit_small_patch14_dinov2.lvd142m', '--encoder-weights', 'random']


def make_folder(root, size=8, classes=3, per_class=4, odd=None):
    """classes x per_class random PNGs of size x size; `odd` = (class, index, size) makes one image another size."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(root / f'class{c}', exist_ok=True)
        for i in range(per_class):
            s = odd[2] if odd and (c, i) == odd[:2] else size
            Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(root / f'class{c}' / f'{i}.png')
    return root


def args(data, out, *extra, enc=ENC):
    base = ['--data-dir', str(data), '--out', str(out), '--model', 'SiT-Ti/2', '--projector-dim', '64',
            '--batch-size', '4', '--log-every', '1', '--sample-every', '0', '--ckpt-every', '1000', '--device', 'cpu']
    return train_cifar.parse_args(base + enc + list(extra))


def log(out):
    return [json.loads(line) for line in open(out / 'log.jsonl')]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('data'))


def test_trains_and_writes_checkpoint_samples_log(data, tmp_path):
    out = tmp_path / 'run'
    train_cifar.main(args(data, out, '--steps', '4', '--sample-every', '4', '--sample-steps', '2'))
    recs = log(out)
    assert [r['step'] for r in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(r['loss']) and r['token'] > 0 and r['align'] != 0 for r in recs)  # all three REG terms live
    ckpt = reg.load_checkpoint(str(out / '0000004.pt'))
    assert ckpt['step'] == 4 and ckpt['config']['num_classes'] == 3 and ckpt['config']['input_size'] == 8
    assert ckpt['config']['encoder_dim'] == 384 and ckpt['args']['method'] == 'reg'
    img = Image.open(out / 'samples_0000004.png')
    assert img.size == (8 * 10 + 2, 3 * 10 + 2)           # 3 rows (classes) x 8 columns of 8x8 samples, 2px padding
    with pytest.raises(SystemExit, match='--resume'):     # never overwrite a run that holds checkpoints
        train_cifar.main(args(data, out, '--steps', '4'))
    with pytest.raises(SystemExit, match='--method'):     # resume under another method names the difference
        train_cifar.main(args(data, out, '--steps', '6', '--method', 'repa', '--resume'))


def ctrl_c_at(monkeypatch, at):
    """Make reg.train_step deliver a real SIGINT to this process during step `at` (1-based)."""
    calls, step = [], reg.train_step
    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*a, **k)
    monkeypatch.setattr(reg, 'train_step', interrupted)


def test_resume_after_ctrl_c_reproduces_uninterrupted_run(data, tmp_path, monkeypatch):
    a, b = tmp_path / 'a', tmp_path / 'b'               # 12 images, batch 4: 3 steps an epoch, resume mid-epoch 1
    train_cifar.main(args(data, a, '--steps', '7', '--ckpt-every', '4'))
    with monkeypatch.context() as m:
        ctrl_c_at(m, 2)                                  # Ctrl-C in step 2: the step ends, is saved, the run stops
        train_cifar.main(args(data, b, '--steps', '7', '--ckpt-every', '4'))
    assert [os.path.basename(p) for p in reg.list_checkpoints(str(b))] == ['0000002.pt']
    train_cifar.main(args(data, b, '--steps', '5', '--resume'))       # resume twice, once across a checkpoint
    train_cifar.main(args(data, b, '--steps', '7', '--ckpt-every', '4', '--resume'))
    assert log(a) == [{**r, 'img_per_s': log(a)[i]['img_per_s']} for i, r in enumerate(log(b))]
    sa, sb = reg.load_checkpoint(str(a / '0000007.pt')), reg.load_checkpoint(str(b / '0000007.pt'))
    for part in ('model', 'ema'):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])
    assert torch.equal(sa['rng']['torch'], sb['rng']['torch'])
    opt_a, opt_b = sa['opt']['state'], sb['opt']['state']
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])


def test_non_finite_loss_stops_without_saving_it(data, tmp_path, monkeypatch):
    calls, loss = [], reg.reg_loss
    def poisoned(*a, **k):                             # the loss turns NaN in step 3, found at the save in step 4
        calls.append(1)
        out = loss(*a, **k)
        return {**out, 'loss': out['loss'] * float('nan')} if len(calls) >= 3 else out
    monkeypatch.setattr(reg, 'reg_loss', poisoned)
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='not finite at step 4.*0000002.pt'):
        train_cifar.main(args(data, out, '--steps', '6', '--ckpt-every', '2', '--log-every', '100'))
    assert [os.path.basename(p) for p in reg.list_checkpoints(str(out))] == ['0000002.pt']


def test_feature_cache_matches_live_encoder(data, tmp_path):
    live, cached = tmp_path / 'live', tmp_path / 'cached'
    train_cifar.main(args(data, live, '--steps', '4'))
    train_cifar.main(args(data, cached, '--steps', '4', '--cache-features', '--cache-dir', str(tmp_path)))
    assert len(list(tmp_path.glob('feats-*.npy'))) == 1
    for r, s in zip(log(live), log(cached)):           # steps 2-4 use other images and flips than step 1
        for k in ('loss', 'denoise', 'token', 'align'):
            assert r[k] == pytest.approx(s[k], rel=2e-3, abs=1e-4), (r['step'], k)


def test_sit_needs_no_encoder_and_bench_reports(data, tmp_path):
    res = train_cifar.main(train_cifar.parse_args(['--data-dir', str(data), '--model', 'SiT-Ti/2', '--method', 'sit',
                                                   '--encoder', 'no-such-encoder', '--batch-size', '4', '--bench', '2',
                                                   '--device', 'cpu']))
    assert res['img_per_s'] > 0 and res['ms_fwd_bwd'] > 0 and res['tflops'] > 0


def test_fd_evaluation_and_npz(data, tmp_path):
    out = tmp_path / 'run'
    train_cifar.main(args(data, out, '--steps', '2', '--eval-every', '2', '--eval-n', '6', '--sample-steps', '2',
                          '--eval-encoder', 'tf_efficientnet_lite0', '--eval-encoder-weights', 'random',
                          '--cache-dir', str(tmp_path), '--save-npz'))
    fd = [r['fd'] for r in log(out) if 'fd' in r]
    assert len(fd) == 1 and np.isfinite(fd[0]) and fd[0] > 0
    assert np.load(out / 'samples_0000002.npz')['arr_0'].shape == (6, 8, 8, 3)
    assert len(list(tmp_path.glob('stats-*.pt'))) == 1


def test_bad_input_gives_clear_errors(data, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    train_cifar.main(args(data, out, '--steps', '1'))
    (out / '0000001.pt').write_bytes(b'garbage' * 10)
    with pytest.raises(SystemExit, match='corrupt'):
        train_cifar.main(args(data, out, '--steps', '2', '--resume'))
    mixed = make_folder(tmp_path / 'mixed', odd=(1, 2, 16))
    with pytest.raises(SystemExit, match='differ in size.*16x16'):
        train_cifar.main(args(mixed, tmp_path / 'r2', '--steps', '1'))
    make_folder(tmp_path / 'split' / 'train')                          # the CIFAR tarball's layout, one level too high
    with pytest.raises(SystemExit, match='directly in one folder per class.*split/train'):
        train_cifar.main(args(tmp_path / 'split', tmp_path / 'r6', '--steps', '1'))
    broken = make_folder(tmp_path / 'broken')
    (broken / 'class1' / '3.png').write_bytes(b'not a png')
    with pytest.raises(SystemExit, match='class1/3.png'):
        train_cifar.main(args(broken, tmp_path / 'r7', '--steps', '1'))
    odd = make_folder(tmp_path / 'odd', size=9)
    with pytest.raises(SystemExit, match='not a multiple of patch_size'):
        train_cifar.main(args(odd, tmp_path / 'r3', '--steps', '1'))
    with pytest.raises(SystemExit, match='--encoder-weights'):            # offline hub -> names the fix
        train_cifar.main(args(data, tmp_path / 'r4', '--steps', '1', enc=['--encoder', 'dinov2-s']))
    def offline(*a, **k):                                                # as torchvision fails without a network
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(train_cifar, 'CIFAR10', offline)
    with pytest.raises(SystemExit, match='ImageFolder'):                 # no data, no network: says what to put there
        train_cifar.main(args(tmp_path / 'nothing', tmp_path / 'r5', '--steps', '1'))

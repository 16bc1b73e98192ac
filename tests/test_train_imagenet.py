"""Tests of train_imagenet.py on CPU, offline: a generated ImageFolder, a tiny random SD-VAE-layout AutoencoderKL,
SiT-Ti/2 on 4x4 latents (32 px images) and a random DINOv2-S at 28 px (grid 2)."""
import functools
import json
import os
import shutil
import signal
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault('HF_HUB_OFFLINE', '1')                       # never wait for the hub
diffusers = pytest.importorskip('diffusers')
import reg                                                          # noqa: E402
import train_imagenet as ti                                         # noqa: E402

TINY = ['--preset', 'SiT-Ti/2', '--encoder', 'vit_small_patch14_dinov2.lvd142m', '--encoder-weights', 'random',
        '--device', 'cpu', '--global-batch', '4', '--micro-batch', '2', '--sample-every', '0']


def prepare(root, out, *extra):
    return ti.main(['prepare', '--data', str(root / 'images'), '--out', str(out), '--resolution', '32', '--vae',
                    str(root / 'vae'), '--shard-size', '5', '--workers', '0', '--batch-size', '3', *extra])


@pytest.fixture(scope='module', autouse=True)
def shared_encoder():
    """One random encoder built once (it is frozen, so runs can share it; building it is most of a short run's time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reg, 'load_encoder', functools.lru_cache(reg.load_encoder))
        yield


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet')
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / 'images' / f'n0{c}')
        for i in range(4):
            w, h = (80, 64) if (c, i) == (0, 0) else (48, 40)      # the first image takes ADM's BOX-halving branch
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / 'images' / f'n0{c}' / f'{i}.png')
    torch.manual_seed(0)
    diffusers.AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                            block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                            norm_num_groups=4).save_pretrained(root / 'vae')
    prepare(root, root / 'prep')
    return root


def load(path):
    return torch.load(path, weights_only=True)


def test_prepare_writes_crops_and_posteriors(root):
    meta = json.load(open(root / 'prep' / 'manifest.json'))
    assert meta['complete'] and meta['counts'] == [5, 5, 2] and meta['classes'] == ['n00', 'n01', 'n02']
    shard = load(root / 'prep' / 'shard_00000.pt')
    assert shard['images'].shape == (5, 3, 32, 32) and shard['images'].dtype == torch.uint8
    assert shard['mean'].shape == shard['std'].shape == (5, 4, 4, 4) and shard['mean'].dtype == torch.float16
    assert shard['labels'].tolist() == [0, 0, 0, 0, 1]
    # 80x64 -> BOX halving to 40x32 (short side 64 >= 2 x 32) -> bicubic to the same size -> centre columns 4..35
    with Image.open(root / 'images' / 'n00' / '0.png') as im:
        want = np.asarray(im.convert('RGB').resize((40, 32), Image.BOX))[:, 4:36]
    assert np.array_equal(shard['images'][0].permute(1, 2, 0).numpy(), want)
    vae = ti.load_vae(str(root / 'vae'), 'cpu')
    with torch.no_grad():
        post = vae.encode(shard['images'].float() / 127.5 - 1).latent_dist
    assert torch.allclose(shard['mean'].float(), post.mean, atol=2e-3) and torch.allclose(shard['std'].float(), post.std, rtol=2e-3)


def test_interrupted_preparation_is_refused_then_resumed(root, tmp_path):
    prep = tmp_path / 'prep'
    shutil.copytree(root / 'prep', prep)
    last = load(prep / 'shard_00002.pt')
    os.remove(prep / 'shard_00002.pt')
    with pytest.raises(SystemExit, match='incomplete'):
        ti.main(['train', '--data', str(prep), '--out', str(tmp_path / 'run'), *TINY])
    before = [os.stat(prep / f'shard_0000{i}.pt').st_mtime_ns for i in range(2)]
    prepare(root, prep)
    assert [os.stat(prep / f'shard_0000{i}.pt').st_mtime_ns for i in range(2)] == before    # finished shards skipped
    again = load(prep / 'shard_00002.pt')
    assert all(torch.equal(last[k], again[k]) for k in last)
    assert json.load(open(prep / 'manifest.json'))['done'] == [f'shard_0000{i}.pt' for i in range(3)]


def test_bad_input_says_what_to_do(root, tmp_path, monkeypatch):
    os.makedirs(tmp_path / 'flat')
    with pytest.raises(SystemExit, match='not an ImageFolder'):
        ti.main(['prepare', '--data', str(tmp_path / 'flat'), '--out', str(tmp_path / 'p0')])
    shutil.copytree(root / 'images', tmp_path / 'small')
    Image.new('RGB', (20, 30)).save(tmp_path / 'small' / 'n01' / 'tiny.png')
    with pytest.raises(SystemExit, match=r'tiny\.png: it is 20x30.*--upscale'):
        ti.main(['prepare', '--data', str(tmp_path / 'small'), '--out', str(tmp_path / 'p1'), '--resolution', '32',
                 '--vae', str(root / 'vae'), '--workers', '0'])
    with pytest.raises(SystemExit, match='--vae'):
        ti.main(['prepare', '--data', str(root / 'images'), '--out', str(tmp_path / 'p2'), '--vae', str(tmp_path / 'none')])
    with pytest.raises(SystemExit, match='--encoder-weights'):                            # DINOv2 offline, no file
        ti.main(['train', '--data', str(root / 'prep'), '--out', str(tmp_path / 'r'), *TINY[:2], '--encoder', 'dinov2-s', *TINY[6:]])
    monkeypatch.setenv('WORLD_SIZE', '3')
    with pytest.raises(SystemExit, match='not a multiple'):
        ti.main(['train', '--data', str(root / 'prep'), '--out', str(tmp_path / 'r'), *TINY])


def weights(folder, step):
    state = load(os.path.join(folder, f'{step:07d}.pt'))
    return state['model'], state['ema']


def ddp_worker(rank, port, argv):
    """What torchrun sets up for each process (gloo on CPU)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    ti.main(argv)


def test_two_processes_equal_one_and_resume_is_exact(root, tmp_path):
    one = str(tmp_path / 'one')
    args = ['train', '--data', str(root / 'prep'), *TINY, '--steps', '3', '--log-every', '1']
    ti.main([*args, '--out', one, '--sample-every', '2', '--sample-steps', '2', '--vae', str(root / 'vae')])
    assert os.path.isfile(os.path.join(one, 'samples_0000002.png'))
    assert [json.loads(l)['step'] for l in open(os.path.join(one, 'log.jsonl'))] == [1, 2, 3]
    two = str(tmp_path / 'two')                   # 1 step, then resumed to 3: every rank must resume its optimiser too
    for steps in (['--steps', '1'], ['--steps', '3', '--resume']):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]             # forked, not spawned: the children skip importing torch and timm
        torch.multiprocessing.start_processes(ddp_worker, (port, [*args[:-4], *steps, '--log-every', '1', '--out', two]),
                                              nprocs=2, start_method='fork')
    (m1, e1), (m2, e2) = weights(one, 3), weights(two, 3)
    init = reg.make_model('SiT-Ti/2', input_size=4, num_classes=3, encoder_dim=384).state_dict()
    assert any(not torch.allclose(m1[k], init[k]) for k in m1)                            # it did train
    for a, b in ((m1, m2), (e1, e2)):
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), 'DDP run differs from the one-process run'
    part = str(tmp_path / 'part')
    ti.main([*args[:-4], '--steps', '1', '--out', part])
    ti.main([*args[:-4], '--steps', '3', '--out', part, '--resume'])
    m3, e3 = weights(part, 3)
    assert all(torch.equal(m1[k], m3[k]) and torch.equal(e1[k], e3[k]) for k in m1), 'resume is not exact'


def test_ctrl_c_finishes_the_step_and_saves(root, tmp_path, monkeypatch):
    calls, train_step = [], reg.train_step
    def step_then_ctrl_c(*args, **kwargs):
        out = train_step(*args, **kwargs)
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(1)
        return out
    monkeypatch.setattr(reg, 'train_step', step_then_ctrl_c)
    ti.main(['train', '--data', str(root / 'prep'), '--out', str(tmp_path), *TINY, '--steps', '9', '--log-every', '5'])
    assert len(calls) == 1 and [os.path.basename(p) for p in reg.list_checkpoints(str(tmp_path))] == ['0000001.pt']


def test_nonfinite_loss_stops_without_saving_it(root, tmp_path):
    with pytest.raises(SystemExit, match='non-finite'):
        ti.main(['train', '--data', str(root / 'prep'), '--out', str(tmp_path), *TINY, '--steps', '3', '--lr', '1e30',
                 '--log-every', '1', '--ckpt-every', '1'])
    for path in reg.list_checkpoints(str(tmp_path)):
        assert all(torch.isfinite(v).all() for v in load(path)['model'].values())


def test_bench_reports_speed_and_flops():
    r = ti.main(['train', '--synthetic', '--bench', '2', '--warmup', '1', '--resolution', '32', *TINY])
    assert r['images_per_s'] > 0 and min(r['encoder_ms'], r['fwd_bwd_ms'], r['optimizer_ms']) > 0
    assert r['step_ms'] == pytest.approx(r['encoder_ms'] + r['fwd_bwd_ms'] + r['optimizer_ms'])
    enc = reg.load_encoder('vit_small_patch14_dinov2.lvd142m', 4, 'random')              # 56 px: 16 patches + cls
    with FlopCounterMode(display=False) as counter:                                  # PyTorch's own count
        enc(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))
    assert ti.encoder_flops(enc) == pytest.approx(counter.get_total_flops(), rel=0.03)


def test_plain_sit_never_loads_or_runs_an_encoder():
    argv = ['train', '--synthetic', '--bench', '1', '--warmup', '1', '--resolution', '32', *TINY, '--method', 'sit']
    r = ti.main([a if a != 'vit_small_patch14_dinov2.lvd142m' else 'no-such-encoder' for a in argv])
    assert r['encoder_ms'] < 1 and r['images_per_s'] > 0

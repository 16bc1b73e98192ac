"""sample.py on CPU, offline, with tiny random models: outputs, resume, seeds, the release's layout, the VAE, metrics, errors."""
import argparse
import copy
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')                                      # never wait on the hub
import numpy as np
import pytest
import torch
from PIL import Image

import reg
import sample

ENC = 'test_vit'                                                                  # tiny timm ViT (64-d), random weights


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """Our checkpoint layout (reg.Run.save) of a tiny REG model on 8x8 RGB inputs, 4 classes, 64-d token."""
    torch.manual_seed(0)
    model = reg.make_model('SiT-Ti/2', input_size=8, in_channels=3, num_classes=4, encoder_dim=64)
    for n, p in model.named_parameters():                                         # adaLN-Zero starts at v = 0: perturb
        if 'adaLN' in n or 'final_layer' in n:
            torch.nn.init.normal_(p, std=0.05)
    ema = copy.deepcopy(model)
    folder = tmp_path_factory.mktemp('run')
    reg.Run(str(folder)).save(7, model, ema, torch.optim.AdamW(model.parameters()))
    return reg.list_checkpoints(str(folder))[-1]


def run(ckpt, out, *flags):
    argv = [str(ckpt), '--out', str(out), '--steps', '3', '--batch-size', '3', '--device', 'cpu', *map(str, flags)]
    return sample.main(sample.parse_args(argv))


def npz(path):
    return np.load(path)['arr_0']


def test_grid_and_npz_shapes_and_arrangement(ckpt, tmp_path):
    g = run(ckpt, tmp_path / 'grid', '--labels', '0,1,2,3', '--per-row', 2, '--save-png')
    grid = np.asarray(Image.open(g['path']))
    assert grid.shape == (4 * 8, 2 * 8, 3) and grid.dtype == np.uint8 and g['samples'] == 8
    r = run(ckpt, tmp_path / 'npz', '--npz', '--num-samples', 7, '--shard-size', 3)   # SDE: same batch starts
    x = npz(r['path'])
    assert r['path'].endswith('samples_7.npz') and x.shape == (7, 8, 8, 3) and x.dtype == np.uint8
    assert x.std() > 5                                                            # not a constant image
    # sample i has label i % 4 in both modes, so grid cell (row i % 4, column i // 4) is npz sample i; SDE noise is
    # per batch: batches 0-2 and 3-5 are the same in both runs, the last (6-7 vs 6) is not
    for i in range(6):
        r_, c_ = i % 4, i // 4
        np.testing.assert_array_equal(grid[8 * r_:8 * r_ + 8, 8 * c_:8 * c_ + 8], x[i])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'grid' / 'png' / '000005.png')), x[5])


def test_interrupted_run_resumes_to_the_same_file(ckpt, tmp_path):
    full = npz(run(ckpt, tmp_path / 'a', '--npz', '--num-samples', 8, '--shard-size', 3)['path'])
    part = run(ckpt, tmp_path / 'b', '--npz', '--num-samples', 8, '--shard-size', 3, '--max-shards', 1)
    assert part == dict(done=1, shards=3) and not (tmp_path / 'b' / 'samples_8.npz').exists()
    first = tmp_path / 'b' / 'shard-0000000-0000003.npz'
    stamp = first.stat().st_mtime_ns
    resumed = npz(run(ckpt, tmp_path / 'b', '--npz', '--num-samples', 8, '--shard-size', 3)['path'])
    assert np.array_equal(full, resumed) and first.stat().st_mtime_ns == stamp   # finished shard not redone


def test_seeds_reproduce_and_ode_noise_is_per_sample(ckpt, tmp_path):
    a = npz(run(ckpt, tmp_path / 'a', '--npz', '--num-samples', 5, '--mode', 'ode', '--seed', 1)['path'])
    b = npz(run(ckpt, tmp_path / 'b', '--npz', '--num-samples', 5, '--mode', 'ode', '--seed', 1)['path'])
    c = npz(run(ckpt, tmp_path / 'c', '--npz', '--num-samples', 5, '--mode', 'ode', '--seed', 1, '--batch-size', 2)['path'])
    d = npz(run(ckpt, tmp_path / 'd', '--npz', '--num-samples', 5, '--mode', 'ode', '--seed', 2)['path'])
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).max() <= 1                                   # other batching: same noise per sample
    assert np.abs(a.astype(int) - d).mean() > 5


def test_official_layout_and_bare_state_dict(ckpt, tmp_path):
    ours = npz(run(ckpt, tmp_path / 'ours', '--npz', '--num-samples', 4)['path'])
    state = reg.load_checkpoint(ckpt)
    names = {'token_embedder.': 'cls_projectors2.', 'token_norm.': 'wg_norm.', 'projector.': 'projectors.0.'}
    def official(sd):
        for new, old in names.items():
            sd = {(old + k[len(new):] if k.startswith(new) else k): v for k, v in sd.items()}
        return sd
    sd = official(state['ema'])
    assert 'cls_projectors2.weight' in sd and 'projectors.0.0.weight' in sd and 'token_embedder.weight' not in sd
    release = dict(model=official(state['model']), ema=sd, opt={}, steps=7,
                   args=argparse.Namespace(model='SiT-Ti/2', encoder_depth=2, enc_type='dinov2-vit-b'))
    torch.save(release, tmp_path / 'release.pt')
    torch.save(state['ema'], tmp_path / 'bare.pt')
    theirs = npz(run(tmp_path / 'release.pt', tmp_path / 'theirs', '--npz', '--num-samples', 4)['path'])
    bare = npz(run(tmp_path / 'bare.pt', tmp_path / 'bare', '--npz', '--num-samples', 4)['path'])
    assert np.array_equal(ours, theirs) and np.array_equal(ours, bare)


def test_vae_decodes_latents(tmp_path):
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)                                                          # the SD-VAE layout, narrower
    vae = diffusers.AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                                  block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4, sample_size=32)
    vae.save_pretrained(tmp_path / 'vae')
    loaded = sample.load_vae(str(tmp_path / 'vae'))
    out = loaded.decode(torch.randn(2, 4, 4, 4)).sample
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    model = reg.make_model('SiT-Ti/2', input_size=4, in_channels=4, num_classes=3, encoder_dim=64)
    reg.save_checkpoint(str(tmp_path / 'latent.pt'), dict(model=model.state_dict(), ema=model.state_dict(), opt={},
                                                         step=0, config=vars(model.cfg)))
    r = run(tmp_path / 'latent.pt', tmp_path / 'out', '--vae', tmp_path / 'vae', '--per-row', 1, '--mode', 'ode')
    assert np.asarray(Image.open(r['path'])).shape == (3 * 32, 32, 3)
    with pytest.raises(SystemExit, match='--vae FOLDER'):
        sample.load_vae(str(tmp_path / 'no-such-vae'))


def test_metrics_and_bench(ckpt, tmp_path):
    gen = run(ckpt, tmp_path / 'gen', '--npz', '--num-samples', 6, '--save-png')
    other = tmp_path / 'ref' / 'train' / 'cat'                                    # cifar10-train: class folders
    other.mkdir(parents=True)
    for i, a in enumerate(np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)):
        Image.fromarray(a).save(other / f'{i}.png')
    fd = ['--fd-encoder', ENC, '--fd-encoder-weights', 'random', '--npz', '--num-samples', 6]
    same = run(ckpt, tmp_path / 'gen', *fd, '--fd-ref', tmp_path / 'gen' / 'png', '--save-png')
    assert abs(same['fd']) < 1e-4                                                 # identical image sets
    diff = run(ckpt, tmp_path / 'gen', *fd, '--fd-ref', 'cifar10-train', '--data-dir', tmp_path / 'ref' / 'train', '--save-png')
    assert diff['fd'] > 0.1 and len(list((tmp_path / 'gen').glob('fd-ref-*.pt'))) == 2
    tok = run(ckpt, tmp_path / 'tok', '--encoder', ENC, '--encoder-weights', 'random', '--npz', '--num-samples', 4)
    assert -1 <= tok['token_consistency'] <= 1 and gen['samples'] == 6
    b = run(ckpt, tmp_path / 'bench', '--bench', 1, '--mode', 'ode', '--steps', 4, '--cfg-scale', 2, '--guidance-high', 0.5)
    assert b['nfe_per_sample'] == 6 and b['samples_per_s'] > 0                    # t = 1, .75 once; t = .5, .25 twice
    assert not (tmp_path / 'bench').exists()


@pytest.mark.parametrize('flags, message', [
    (['--steps', 0], '--steps'),
    (['--guidance-low', 0.6, '--guidance-high', 0.5], '--guidance-low'),
    (['--guidance-high', 1.5], '--guidance-low'),
    (['--labels', '1,4'], '--labels'),
    (['--encoder-depth', 9], 'encoder_depth'),
    (['--weights', 'model', '--batch-size', 0], 'must be >= 1'),
])
def test_bad_flags_exit_with_a_message(ckpt, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(ckpt, tmp_path / 'out', *flags)
    assert not (tmp_path / 'out').exists()


def test_folder_with_other_settings_is_refused(ckpt, tmp_path):
    g = run(ckpt, tmp_path / 'out', '--per-row', 1)
    before = open(g['path'], 'rb').read()
    with pytest.raises(SystemExit, match='other settings.*steps'):
        run(ckpt, tmp_path / 'out', '--per-row', 1, '--steps', 4)
    assert open(g['path'], 'rb').read() == before
    plain = reg.make_model('SiT-Ti/2', method='repa', input_size=8, in_channels=3, num_classes=4, encoder_dim=64)
    reg.save_checkpoint(str(tmp_path / 'repa.pt'), dict(ema=plain.state_dict(), config=vars(plain.cfg)))
    with pytest.raises(SystemExit, match='REG token'):
        run(tmp_path / 'repa.pt', tmp_path / 'repa', '--encoder', ENC, '--encoder-weights', 'random')
    with pytest.raises(SystemExit, match='does not fit'):
        torch.save(dict(ema=plain.state_dict(), config=vars(reg.make_model('SiT-Ti/2', input_size=16).cfg)), tmp_path / 'x.pt')
        run(tmp_path / 'x.pt', tmp_path / 'x')

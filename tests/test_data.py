"""Data loading (image folders, mocked tfds), the decode cache, splits, batches, augmentation."""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from prnas_jax import data
from prnas_jax.errors import UserError


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))  # never the real ~/.cache


def _config(dataset='folder', folder='', tfds_data_dir=None):
  return ml_collections.ConfigDict(
      {'dataset': dataset, 'folder': str(folder), 'tfds_data_dir': tfds_data_dir})


def _colour(label, i):
  return (40 * label + 20, 10 * i + 5, 200 - 30 * label)


def _write(path, rgb, size=(6, 5), mode='RGB'):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new('RGB', size, rgb).convert(mode).save(path)


def _make_folder(root, split='train', counts=(('cat', 3), ('ant', 2), ('dog', 2))):
  """Classes get solid colours; 'ant' is stored as JPEG, the others as PNG."""
  names = sorted(c for c, _ in counts)
  for cls, n in counts:
    for i in range(n):
      ext = 'jpg' if cls == 'ant' else 'png'
      _write(root / split / cls / f'{i:03d}.{ext}', _colour(names.index(cls), i))
  return root


def _one_line_error(fn, *args, match=None):
  with pytest.raises(UserError, match=match) as err:
    fn(*args)
  assert '\n' not in str(err.value)
  return str(err.value)


# ---------------------------------------------------------------------------------------------
# Image folders.

def test_folder_load_labels_and_order(tmp_path):
  root = _make_folder(tmp_path / 'ds')
  (root / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  _write(root / 'train' / '.hidden' / 'x.png', (1, 2, 3))
  _write(root / 'train' / 'dog' / '009.PNG', (50, 50, 50), mode='L')  # grayscale, upper-case
  s = data.load_split(_config(folder=root), 'train')
  assert s.images.shape == (8, 5, 6, 3) and s.images.dtype == np.uint8
  assert s.labels.dtype == np.int32 and s.num_classes == 3
  assert np.bincount(s.labels).tolist() == [2, 3, 3]  # ant, cat, dog: sorted class names
  for img, label in zip(s.images, s.labels):
    red = int(img[0, 0, 0])
    assert red == 50 or abs(red - (40 * label + 20)) <= 3
  # The order is a fixed pseudo-random one (not grouped by class), identical on every load.
  assert not np.all(np.diff(s.labels) >= 0)
  again = data.load_split(_config(folder=root), 'train')
  np.testing.assert_array_equal(again.labels, s.labels)


def test_folder_test_split_uses_train_classes(tmp_path):
  root = _make_folder(tmp_path / 'ds')
  _make_folder(root, 'test', counts=(('dog', 2),))
  s = data.load_split(_config(folder=root), 'test')
  assert s.num_classes == 3 and s.labels.tolist() == [2, 2]
  _make_folder(root, 'test', counts=(('eel', 1),))
  _one_line_error(data.load_split, _config(folder=root), 'test', match='eel')


def test_folder_cache_is_used(tmp_path, monkeypatch):
  root = _make_folder(tmp_path / 'ds')
  first = data.load_split(_config(folder=root), 'train')
  assert len(list((root / '.prnas_cache').glob('train-*.npz'))) == 1

  def fail(*args):
    raise AssertionError('decoded although the cache is valid')

  monkeypatch.setattr(data, '_decode_folder', fail)
  second = data.load_split(_config(folder=root), 'train')
  np.testing.assert_array_equal(second.images, first.images)
  np.testing.assert_array_equal(second.labels, first.labels)
  assert second.num_classes == first.num_classes


def test_folder_cache_invalidated_when_a_file_is_added(tmp_path, monkeypatch):
  root = _make_folder(tmp_path / 'ds')
  data.load_split(_config(folder=root), 'train')
  old = list((root / '.prnas_cache').glob('train-*.npz'))
  _write(root / 'train' / 'ant' / '777.png', (1, 1, 1))
  calls = []
  decode = data._decode_folder
  monkeypatch.setattr(data, '_decode_folder', lambda *a: calls.append(1) or decode(*a))
  s = data.load_split(_config(folder=root), 'train')
  assert calls and len(s.labels) == 8
  new = list((root / '.prnas_cache').glob('train-*.npz'))
  assert len(new) == 1 and new != old  # the stale file was replaced


def test_folder_cache_falls_back_to_user_cache(tmp_path, monkeypatch):
  root = _make_folder(tmp_path / 'ds')
  (root / '.prnas_cache').write_text('a file where the cache dir would go')  # not writable there
  first = data.load_split(_config(folder=root), 'train')
  cached = list((tmp_path / 'xdg' / 'prnas_jax').glob('folder-*/train-*.npz'))
  assert len(cached) == 1
  monkeypatch.setattr(data, '_decode_folder', None)  # would fail if called
  np.testing.assert_array_equal(data.load_split(_config(folder=root), 'train').images, first.images)


def test_folder_errors(tmp_path):
  load = data.load_split
  _one_line_error(load, _config(dataset='imagenet'), 'train', match='imagenet')
  _one_line_error(load, _config(folder=tmp_path / 'missing'), 'train', match='not a directory')
  root = _make_folder(tmp_path / 'ds')
  _one_line_error(load, _config(folder=root), 'valid', match='valid')
  _one_line_error(load, _config(folder=root), 'test', match='no test/ subfolder')
  (root / 'test').mkdir()
  _one_line_error(load, _config(folder=root), 'test', match='no class folders')
  (root / 'test' / 'cat').mkdir()
  (root / 'test' / 'cat' / 'readme.txt').write_text('x')
  _one_line_error(load, _config(folder=root), 'test', match='no images')


def test_folder_mixed_sizes(tmp_path):
  root = _make_folder(tmp_path / 'ds')
  _write(root / 'train' / 'cat' / 'big.png', (9, 9, 9), size=(7, 4))
  msg = _one_line_error(data.load_split, _config(folder=root), 'train', match='different sizes')
  assert 'big.png is 7x4' in msg and ' is 6x5' in msg


def test_folder_corrupt_image(tmp_path):
  root = _make_folder(tmp_path / 'ds')
  (root / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  _one_line_error(data.load_split, _config(folder=root), 'train', match='broken.jpg')


def _only_image(root, write):
  """``load_split`` of a two-class folder whose every image ``write(path)`` writes; the first."""
  for cls in ('a', 'b'):
    (root / 'train' / cls).mkdir(parents=True)
    write(root / 'train' / cls / '0')
  return data.load_split(_config(folder=root), 'train').images[0]


@pytest.mark.parametrize('suffix', ['.png', '.tif'])
def test_16_bit_grey_keeps_its_top_8_bits(tmp_path, suffix):
  """PIL opens 16-bit grey as mode I;16, and its own conversion clips it to 255."""
  top = np.arange(48, dtype=np.uint16).reshape(6, 8) * 5
  image = _only_image(tmp_path, lambda p: Image.fromarray(top * 256 + 99).save(f'{p}{suffix}'))
  np.testing.assert_array_equal(image, np.repeat(top[..., None], 3, axis=-1))


@pytest.mark.parametrize('mode, suffix', [
    ('1', '.bmp'), ('L', '.png'), ('LA', '.png'), ('P', '.gif'), ('RGBA', '.png'),
    ('CMYK', '.tif'), ('YCbCr', '.tif'), ('RGB', '.webp')])
def test_every_image_mode_decodes_to_8_bit_rgb(tmp_path, mode, suffix):
  """Two colours (black and yellow, which every mode holds) in every mode and file format
  a folder takes, decoded as the same 8-bit RGB."""
  rgb = np.zeros((6, 8, 3), np.uint8)
  rgb[:, 4:] = (255, 255, 0) if mode not in ('1', 'L', 'LA') else 255
  image = _only_image(tmp_path, lambda p: Image.fromarray(rgb).convert(mode).save(
      f'{p}{suffix}', **({'lossless': True} if suffix == '.webp' else {})))
  assert image.dtype == np.uint8 and image.shape == rgb.shape
  np.testing.assert_allclose(image, rgb, atol=2)


def test_exif_orientation_is_applied(tmp_path):
  """A camera JPEG stored sideways (EXIF orientation 6: rotate 90 degrees) decodes upright."""
  def write(path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new('RGB', (8, 6), (200, 30, 30)).save(f'{path}.jpg', exif=exif)
  assert _only_image(tmp_path, write).shape == (8, 6, 3)


def test_mean_std(tmp_path):
  for name in ('cifar10', 'cifar100'):
    mean, std = data.mean_std(_config(dataset=name), None)
    np.testing.assert_allclose((mean, std), data.MEAN_STD[name])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  mean, std = data.mean_std(_config(), data.Split(images, np.zeros(5, np.int32), 1))
  x = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, x.std(0), rtol=1e-5)
  assert mean.shape == std.shape == (3,)


# ---------------------------------------------------------------------------------------------
# tfds, mocked (no network, no TensorFlow).

def test_tfds_mock_load_and_cache(tmp_path, monkeypatch):
  config = _config(dataset='cifar10', tfds_data_dir=str(tmp_path))
  (tmp_path / 'cifar10').mkdir()  # where a prepared copy would be; mock_data fakes its content
  with tfds.testing.mock_data(num_examples=6):
    s = data.load_split(config, 'train')
    assert s.images.shape == (6, 32, 32, 3) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int32 and s.num_classes == 10
    assert np.all((0 <= s.labels) & (s.labels < 10))
    assert len(list((tmp_path / '.prnas_cache').glob('cifar10-*-train-*.npz'))) == 1
    monkeypatch.setattr(data, '_decode_tfds', None)  # would fail if called
    again = data.load_split(config, 'train')
  np.testing.assert_array_equal(again.images, s.images)
  np.testing.assert_array_equal(again.labels, s.labels)


def test_tfds_mock_cifar100(tmp_path):
  (tmp_path / 'cifar100').mkdir()
  with tfds.testing.mock_data(num_examples=3):
    s = data.load_split(_config(dataset='cifar100', tfds_data_dir=str(tmp_path)), 'test')
  assert s.images.shape == (3, 32, 32, 3) and s.num_classes == 100


def test_tfds_not_prepared(tmp_path):
  # load_split then turns to the download (test_cifar.py); the ImageNet stream says this.
  msg = _one_line_error(data.tfds_source, 'cifar10', 'train', str(tmp_path), match='not prepared')
  assert 'download_and_prepare' in msg and str(tmp_path) in msg


# ---------------------------------------------------------------------------------------------
# Splitting and batching.

def _indexed_split(n, classes=3):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(3, axis=-1)
  return data.Split(images, (np.arange(n) % classes).astype(np.int32), classes)


def test_split_portion_by_index_order():
  w, a = data.split_portion(_indexed_split(7), 0.5)
  assert w.images[:, 0, 0, 0].tolist() == [0, 1, 2]
  assert a.images[:, 0, 0, 0].tolist() == [3, 4, 5, 6]
  assert w.num_classes == a.num_classes == 3
  for bad in (0.0, 1.0, 0.1):
    _one_line_error(data.split_portion, _indexed_split(7), bad, match='empty half')


def test_subset_is_balanced_and_in_index_order():
  s = _indexed_split(60, classes=3)
  sub = data.subset(s, 10, seed=1)
  idx = sub.images[:, 0, 0, 0]
  assert len(idx) == 10 and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(sub.labels, s.labels[idx])
  assert sorted(np.bincount(sub.labels).tolist()) == [3, 3, 4]
  np.testing.assert_array_equal(data.subset(s, 10, seed=1).labels, sub.labels)
  assert not np.array_equal(data.subset(s, 10, seed=2).images, sub.images)
  assert data.subset(s, 60, seed=0) is s
  _one_line_error(data.subset, s, 0, 0)


def test_epoch_batches():
  idx = data.epoch_batches(np.random.default_rng(0), 10, 3)
  assert idx.shape == (3, 3) and idx.dtype == np.int32
  assert len(set(idx.ravel().tolist())) == 9 and idx.min() >= 0 and idx.max() < 10
  other = data.epoch_batches(np.random.default_rng(1), 10, 3)
  assert not np.array_equal(idx, other)
  assert data.epoch_batches(np.random.default_rng(0), 4, 4).shape == (1, 4)
  msg = _one_line_error(data.epoch_batches, np.random.default_rng(0), 5, 8, match='larger')
  assert '8' in msg and '5' in msg


# ---------------------------------------------------------------------------------------------
# Augmentation. One jitted function per option set keeps compiles few.

_augment = jax.jit(data.augment, static_argnames=('crop_pad', 'flip', 'cutout'))
_ZERO, _ONE = np.zeros(3, np.float32), np.ones(3, np.float32)
H = W = 8


def _coordinate_images(b):
  """Pixel (y, x) holds 1 + y*W + x in every channel (never 0, so padding shows)."""
  img = (1 + np.arange(H * W, dtype=np.uint8)).reshape(H, W, 1).repeat(3, axis=-1)
  return np.broadcast_to(img, (b, H, W, 3)).copy()


def _pixels(x):
  return np.rint(np.asarray(x) * 255).astype(np.int64)  # undo mean 0, std 1


def test_augment_identity_equals_normalize():
  images = np.random.default_rng(0).integers(0, 256, (4, H, W, 3), dtype=np.uint8)
  mean, std = data.MEAN_STD['cifar10']
  out = _augment(jax.random.key(0), images, mean, std, crop_pad=0, flip=False, cutout=0)
  assert out.shape == images.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, data.normalize(images, mean, std), rtol=1e-6, atol=1e-6)
  expected = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_augment_flips_about_half():
  images = _coordinate_images(256)
  out = _pixels(_augment(jax.random.key(1), images, _ZERO, _ONE, crop_pad=0, flip=True, cutout=0))
  flipped = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  same = np.all(out == images, axis=(1, 2, 3))
  assert np.all(flipped ^ same)
  assert 90 < flipped.sum() < 166


def test_augment_crop_shifts_by_padding_offset():
  pad, b = 2, 64
  images = _coordinate_images(b)
  out = _pixels(_augment(jax.random.key(2), images, _ZERO, _ONE, crop_pad=pad, flip=False,
                         cutout=0))
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = set()
  for i in range(b):
    matches = [(oy, ox) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)
               if np.array_equal(out[i], padded[i, oy:oy + H, ox:ox + W])]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) > 15  # most of the 25 offsets occur


@pytest.mark.parametrize('size', [3, 4])
def test_augment_cutout_square(size):
  b = 64
  images = np.full((b, H, W, 3), 255, np.uint8)
  out = np.asarray(_augment(jax.random.key(3), images, _ZERO, _ONE, crop_pad=0, flip=False,
                            cutout=size))
  interior = 0
  for img in out:
    zero = img == 0
    assert np.all(zero == zero[..., :1])  # all channels together
    ys, xs = np.nonzero(zero[..., 0])
    assert len(ys) > 0
    box = zero[ys.min():ys.max() + 1, xs.min():xs.max() + 1, 0]
    assert box.all() and box.shape[0] <= size and box.shape[1] <= size
    if ys.min() > 0 and xs.min() > 0 and ys.max() < H - 1 and xs.max() < W - 1:
      interior += 1
      assert len(ys) == size * size
    assert np.all(img[~zero] == 1.0)
  assert interior > 5


def test_augment_inside_a_jitted_step():
  mean, std = data.MEAN_STD['cifar10']

  @jax.jit
  def step(key, images):
    return data.augment(key, images, mean, std, crop_pad=2, flip=True, cutout=3).mean()

  images = np.random.default_rng(5).integers(0, 256, (4, H, W, 3), dtype=np.uint8)
  a, b = step(jax.random.key(4), images), step(jax.random.key(4), images)
  assert a.dtype == np.float32 and np.isfinite(a) and a == b
  assert step(jax.random.key(6), images) != a

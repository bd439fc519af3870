"""Data sets held in memory as uint8, and augmentation that runs inside the jitted step.

Sources (docs/design.md, Data): CIFAR-10/100 through a prepared tensorflow-datasets copy (read with
``tfds.data_source``, no TensorFlow needed) or, without one, the official archive downloaded and
converted by ``cifar.py``; or a folder laid out ``ROOT/<split>/<class>/*.jpg``. A split is decoded
once and cached as an ``.npz`` (never pickled); later runs load the cache.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from prnas_jax import cifar, files
from prnas_jax.errors import UserError

DATASETS = ('cifar10', 'cifar100', 'folder')
SPLITS = ('train', 'test')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
_SUFFIX_LIST = ', '.join(f'*{s}' for s in IMAGE_SUFFIXES)

# Reference §6 (torchvision ToTensor units, [0, 1]).
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000}
IMAGENET_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')  # tfds' manual_dir

_CACHE_VERSION = 2  # bump when the cached layout or the example order changes
_CACHE_DIRNAME = '.prnas_cache'


@dataclasses.dataclass(frozen=True)
class Split:
  """A whole split in memory: ``images`` uint8 (N, H, W, 3), ``labels`` int32 (N,)."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int

  def __len__(self):
    return len(self.labels)


# ---------------------------------------------------------------------------------------------
# Loading.

def load_split(data_config, split: str) -> Split:
  """Loads ``split`` ('train' | 'test') of ``data_config.dataset``, from the cache if present."""
  name = getattr(data_config, 'dataset', None)
  if name not in DATASETS:
    raise UserError(f'data.dataset {name!r} is unknown: use one of {", ".join(DATASETS)}')
  if split not in SPLITS:
    raise UserError(f'split {split!r} is unknown: use one of {", ".join(SPLITS)}')
  if name == 'folder':
    return _load_folder(getattr(data_config, 'folder', None), split)
  data_dir = _tfds_dir(getattr(data_config, 'tfds_data_dir', None))
  if (source := _tfds_copy(name, split, data_dir)) is not None:
    return _load_tfds(source, split, data_dir)
  return _load_download(name, split, getattr(data_config, 'download', False), data_dir)


def check_source(data_config, splits) -> tuple[tuple[int | None, ...], int]:
  """The checks of a data source that decode at most one image: a folder's layout (at least two
  classes), a prepared tfds data set, or a CIFAR archive that is cached, at hand or may be
  downloaded, for each of ``splits`` (tfds names). Returns the images' shape (tfds: ``None`` for
  sizes that vary) and the class count."""
  name = getattr(data_config, 'dataset', None)
  if name == 'folder':
    listings = [_list_folder(getattr(data_config, 'folder', None), split) for split in splits]
    root, classes, files = listings[0]
    return _decode_image(root, files[0][0]).shape, len(classes)
  if name not in NUM_CLASSES:
    raise UserError(f'data.dataset {name!r} is unknown: use one of {", ".join(DATASETS)}')
  data_dir = _tfds_dir(getattr(data_config, 'tfds_data_dir', None))
  sources = [_tfds_copy(name, split, data_dir) for split in splits]
  if None in sources:
    if not all((user_cache_dir() / 'cifar' / _cifar_cache(name, s)).exists() for s in splits):
      _check_archive(name, getattr(data_config, 'download', False), data_dir)
    return (cifar.SIDE, cifar.SIDE, 3), NUM_CLASSES[name]
  features = sources[0].dataset_info.features
  return tuple(features['image'].shape), int(features['label'].num_classes)


def num_classes(data_config) -> int:
  """The class count of ``data_config``'s data set, without loading it."""
  name = getattr(data_config, 'dataset', None)
  if name == 'folder':
    return len(_list_folder(getattr(data_config, 'folder', None), 'train')[1])
  if name not in NUM_CLASSES:
    raise UserError(f'data.dataset {name!r} is unknown: use one of {", ".join(DATASETS)}')
  return NUM_CLASSES[name]


def mean_std(data_config, train: Split) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std in [0, 1] units: CIFAR constants, or measured on ``train``."""
  name = getattr(data_config, 'dataset', None)
  if name in MEAN_STD:
    mean, std = MEAN_STD[name]
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if name != 'folder':
    raise UserError(f'data.dataset {name!r} is unknown: use one of {", ".join(DATASETS)}')
  if train.images.size == 0:
    raise UserError('the train split is empty: add images before computing its mean and std')
  hist = np.zeros((3, 256), np.int64)  # exact and fast: per-channel histograms of the bytes
  for start in range(0, len(train.images), 4096):
    pixels = np.asarray(train.images[start:start + 4096], np.uint8).reshape(-1, 3)
    for ch in range(3):
      hist[ch] += np.bincount(pixels[:, ch], minlength=256)
  value = np.arange(256) / 255.0
  count = hist.sum(1)
  mean = hist @ value / count
  std = np.sqrt(np.maximum(hist @ np.square(value) / count - np.square(mean), 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _example_order(rel: str) -> bytes:
  # A fixed pseudo-random order (a hash of the relative path, independent of library versions),
  # so that split_portion's index-order halves mix the classes like CIFAR's own order does.
  return hashlib.blake2b(rel.encode(), digest_size=8).digest()


def _list_folder(folder, split):
  """Returns (root, classes, [(relative path, label, size, mtime_ns)]) in example order."""
  if not folder:
    raise UserError('data.folder is not set: point it at a directory laid out '
                    'ROOT/<split>/<class>/*.jpg')
  root = Path(folder).expanduser()
  if not root.is_dir():
    raise UserError(f'data.folder {str(root)!r} is not a directory: point it at ROOT laid out '
                    'ROOT/<split>/<class>/*.jpg')
  split_dir = root / split
  if not split_dir.is_dir():
    raise UserError(f'data.folder {str(root)!r} has no {split}/ subfolder: lay the images out '
                    f'as {root}/{split}/<class>/*.jpg')
  classes = _class_names(split_dir)
  if not classes:
    raise UserError(f'{split_dir} has no class folders: put the images of each class in '
                    f'{split_dir}/<class>/')
  if split != 'train' and (root / 'train').is_dir():
    train_classes = _class_names(root / 'train')
    extra = sorted(set(classes) - set(train_classes))
    if extra:
      raise UserError(f'{split_dir} has classes that train/ lacks ({", ".join(extra[:3])}): '
                      'use the same class folders in every split')
    classes = train_classes
  label_of = {c: i for i, c in enumerate(classes)}
  files = []
  for c in classes:
    class_dir = split_dir / c
    if not class_dir.is_dir():
      continue
    with os.scandir(class_dir) as entries:
      for e in entries:
        if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file():
          st = e.stat()
          files.append((f'{split}/{c}/{e.name}', label_of[c], st.st_size, st.st_mtime_ns))
  if not files:
    raise UserError(f'{split_dir} has no images: put {_SUFFIX_LIST} files in {split_dir}/<class>/')
  if split == 'train' and len(used := {f[1] for f in files}) < 2:
    raise UserError(f'{split_dir} has images of {len(used)} class ({classes[used.pop()]}): a '
                    'classifier needs at least two, put each class in its own folder '
                    f'{split_dir}/<class>/')
  files.sort(key=lambda f: (_example_order(f[0]), f[0]))
  return root, classes, files


def _class_names(split_dir):
  return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith('.'))


def _load_folder(folder, split):
  root, classes, files = _list_folder(folder, split)
  key = hashlib.sha256(f'v{_CACHE_VERSION}\n{len(classes)}\n'.encode())
  for rel, label, size, mtime in files:
    key.update(f'{rel}\t{label}\t{size}\t{mtime}\n'.encode())
  name = f'{split}-{key.hexdigest()[:20]}.npz'
  root_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
  dirs = [root / _CACHE_DIRNAME, user_cache_dir() / f'folder-{root_id}']
  cached = _read_cache(dirs, name)
  if cached is not None:
    return cached
  images = _decode_folder(root, [f[0] for f in files])
  out = Split(images, np.asarray([f[1] for f in files], np.int32), len(classes))
  _write_cache(dirs, name, out, stale_prefix=f'{split}-')
  return out


def _decode_folder(root, rels):
  """Decodes the images at ``root/rel`` into one uint8 (N, H, W, 3) array, in a thread pool."""
  first = _decode_image(root, rels[0])
  out = np.empty((len(rels),) + first.shape, np.uint8)
  out[0] = first

  def work(start, stop):
    for i in range(start, stop):
      img = _decode_image(root, rels[i])
      if img.shape != first.shape:
        return i, img.shape
      out[i] = img
    return None

  chunk = 512
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(work, s, min(s + chunk, len(rels))) for s in range(1, len(rels), chunk)]
    try:
      for fut in futures:
        if (bad := fut.result()) is not None:
          i, shape = bad
          raise UserError(f'images have different sizes: {rels[0]} is {first.shape[1]}x'
                          f'{first.shape[0]}, {rels[i]} is {shape[1]}x{shape[0]} (in {root}): '
                          'resize them all to one size')
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise
  return out


def _decode_image(root, rel):
  from PIL import Image, ImageOps
  try:
    with Image.open(root / rel) as im:
      return _rgb8(ImageOps.exif_transpose(im), root / rel)
  except UserError:
    raise
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f'cannot read image {root / rel} ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else "unreadable"}): '
                    'replace or delete the file') from None


_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_NO_RANGE = {'I': '32-bit integers', 'F': 'floats', 'LAB': 'CIELAB'}


def _rgb8(im, path) -> np.ndarray:
  """``im`` as uint8 RGB: 16-bit grey (PNG, TIFF) keeps its top 8 bits (PIL's own conversion
  clips it to 255); modes without a fixed range or without a conversion to RGB are refused."""
  if im.mode in _SIXTEEN_BIT or (im.mode == 'I' and im.format == 'PNG'):
    grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if im.mode in _NO_RANGE:
    raise UserError(f'cannot read image {path}: its pixels are {_NO_RANGE[im.mode]} (mode '
                    f'{im.mode}), which have no fixed conversion to 8-bit RGB: save it as 8-bit '
                    'RGB or grey')
  return np.asarray(im.convert('RGB'), dtype=np.uint8)


class NotPrepared(UserError):
  """A tfds data set without a prepared copy."""


def _tfds_dir(data_dir) -> str:
  from tensorflow_datasets.core import constants
  data_dir = os.fspath(data_dir) if data_dir else constants.get_default_data_dir()
  return data_dir if '://' in data_dir else os.path.expanduser(data_dir)


def tfds_source(name, split, data_dir):
  """The random-access tfds data source of a prepared ``name`` (array_record), never
  downloading; a one-line UserError that says how to prepare it when it is missing."""
  import tensorflow_datasets as tfds  # slow import: only when a tfds data set is used

  data_dir = _tfds_dir(data_dir)
  try:
    # download=False: an offline machine would otherwise retry for minutes before failing.
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              builder_kwargs={'file_format': 'array_record'})
  except (KeyError, ValueError, NotImplementedError, FileNotFoundError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    how = (f'put {" and ".join(IMAGENET_FILES)} (from https://image-net.org/download-images) '
           f'into {data_dir}/downloads/manual/, then with tensorflow run'
           if name == 'imagenet2012' else 'on a machine with internet and tensorflow run')
    raise NotPrepared(
        f'tfds data set {name} ({split}) is not prepared in array_record format under {data_dir} '
        f'({reason}): {how} python -c "import '
        f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}', "
        f"file_format='array_record').download_and_prepare()\" and copy that data dir here, "
        'or set data.tfds_data_dir') from None
  return source


def _tfds_copy(name, split, data_dir):
  """The prepared tfds source of ``name``, or None where there is none and the official archive
  stands in (CIFAR)."""
  downloadable = name in cifar.ARCHIVES
  # Without the data set's folder there is no tfds copy (tfds would log a warning saying so).
  if downloadable and '://' not in data_dir and not os.path.isdir(os.path.join(data_dir, name)):
    return None
  try:
    return tfds_source(name, split, data_dir)
  except NotPrepared:
    if downloadable:
      return None
    raise


def _cifar_cache(name, split) -> str:
  return f'{name}-{split}-v{_CACHE_VERSION}.npz'


def _check_archive(name, download, tfds_dir) -> None:
  """One line if ``name``'s archive may not be downloaded and was not copied by hand."""
  folder = user_cache_dir() / 'downloads'
  if not download and not (folder / cifar.ARCHIVES[name].filename).exists():
    raise UserError(f'{name} has no prepared tfds copy under {tfds_dir} and data.download is '
                    f'False: pass --config.data.download=True, '
                    f'{cifar.ways_out(name, folder)}')


def _load_download(name, split, download, tfds_dir):
  """``name`` from its official archive (cifar.py), downloaded and converted once into the
  user cache; one process of a machine at a time prepares it."""
  folder = user_cache_dir() / 'downloads'
  dirs = [user_cache_dir() / 'cifar']
  fname = functools.partial(_cifar_cache, name)
  cached = _read_cache(dirs, fname(split))
  if cached is not None:
    return cached
  _check_archive(name, download, tfds_dir)
  with files.lock(folder / f'.{name}.lock'):
    cached = _read_cache(dirs, fname(split))  # another process may have prepared it meanwhile
    if cached is not None:
      return cached
    splits = {s: Split(images, labels, NUM_CLASSES[name])
              for s, (images, labels) in cifar.prepare(name, folder).items()}
    for s, out in splits.items():
      _write_cache(dirs, fname(s), out, stale_prefix=f'{name}-{s}-')
  return splits[split]


def _load_tfds(source, split, data_dir):
  info = source.dataset_info
  key = hashlib.sha256(f'v{_CACHE_VERSION}\n{info.full_name}\n{split}\n{len(source)}\n'.encode())
  for rel, size, mtime in _dir_listing(info.data_dir):
    key.update(f'{rel}\t{size}\t{mtime}\n'.encode())
  fname = f'{info.full_name.replace("/", "-")}-{split}-{key.hexdigest()[:20]}.npz'
  dirs = [user_cache_dir() / 'tfds']
  if '://' not in data_dir:
    dirs.insert(0, Path(data_dir) / _CACHE_DIRNAME)
  cached = _read_cache(dirs, fname)
  if cached is not None:
    return cached
  images, labels = _decode_tfds(source)
  out = Split(images, labels, int(info.features['label'].num_classes))
  _write_cache(dirs, fname, out, stale_prefix=f'{info.full_name.replace("/", "-")}-{split}-')
  return out


def _decode_tfds(source):
  """Reads every example of a tfds data source into uint8 images and int32 labels."""
  n = len(source)
  if n == 0:
    raise UserError(f'tfds split {source.split} is empty: prepare the data set again')
  first = source[0]
  images = np.empty((n,) + np.shape(first['image']), np.uint8)
  labels = np.empty(n, np.int32)
  for i in range(n):
    ex = first if i == 0 else source[i]
    images[i] = ex['image']
    labels[i] = ex['label']
  return images, labels


def _dir_listing(path):
  """(name, size, mtime_ns) of the files directly in ``path`` (empty if not a local dir)."""
  try:
    with os.scandir(os.fspath(path)) as entries:
      return sorted((e.name, *_size_mtime(e)) for e in entries if e.is_file())
  except (OSError, TypeError, ValueError):
    return []


def _size_mtime(entry):
  st = entry.stat()
  return st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# The cache: one uncompressed .npz per split, written atomically.

def user_cache_dir() -> Path:
  """``$XDG_CACHE_HOME/prnas_jax`` (default ``~/.cache/prnas_jax``): decoded data sets and XLA's
  compiled programs."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return Path(base) / 'prnas_jax'


def _read_cache(dirs, name):
  for d in dirs:
    path = d / name
    if not path.is_file():
      continue
    try:
      with np.load(path, allow_pickle=False) as z:
        return Split(z['images'], z['labels'].astype(np.int32), int(z['num_classes']))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
      continue  # unreadable: decode again and overwrite
  return None


def _write_cache(dirs, name, split: Split, stale_prefix):
  """Writes to the first writable dir in ``dirs``; drops that dir's older files of the split."""
  for d in dirs:
    try:
      with files.atomic_open(d / name, 'wb') as f:
        np.savez(f, images=split.images, labels=split.labels,
                 num_classes=np.int64(split.num_classes))
    except OSError:
      continue
    for old in d.glob(f'{stale_prefix}*.npz'):
      if old.name != name:
        try:
          old.unlink()
        except OSError:
          pass
    return d / name
  return None


# ---------------------------------------------------------------------------------------------
# Splitting and batching.

def split_portion(split: Split, portion: float) -> tuple[Split, Split]:
  """The first ``floor(portion*N)`` examples (for the weights) and the rest (for the alphas)."""
  n = len(split.labels)
  k = int(np.floor(portion * n))
  if not 0 < k < n:
    raise UserError(f'train portion {portion} of {n} examples leaves an empty half: '
                    'use a portion strictly between 0 and 1 and at least 2 examples')
  return _take(split, slice(0, k)), _take(split, slice(k, n))


def subset(split: Split, n: int, seed: int) -> Split:
  """A random subset of ``n`` examples, as class-balanced as ``n`` allows, in index order."""
  total = len(split.labels)
  if n < 1:
    raise UserError(f'subset size {n} is invalid: use at least 1 example')
  if n >= total:
    return split
  perm = np.random.default_rng(seed).permutation(total)
  labels = split.labels[perm]
  by_class = np.argsort(labels, kind='stable')
  sorted_labels = labels[by_class]
  rank = np.empty(total, np.int64)
  rank[by_class] = np.arange(total) - np.searchsorted(sorted_labels, sorted_labels, side='left')
  # Round-robin over the classes: every class's first pick, then every second pick, ...
  picked = perm[np.lexsort((np.arange(total), rank))[:n]]
  return _take(split, np.sort(picked))


def _take(split, index):
  return Split(split.images[index], split.labels[index], split.num_classes)


def epoch_batches(rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
  """(steps, batch) int32 indices of one epoch: a random permutation, remainder dropped."""
  if batch < 1:
    raise UserError(f'batch size {batch} is invalid: use at least 1')
  if batch > n:
    raise UserError(f"batch size {batch} is larger than the split's {n} examples: lower the "
                    'batch size or use more data')
  steps = n // batch
  return rng.permutation(n)[:steps * batch].reshape(steps, batch).astype(np.int32)


def eval_batches(images, labels, batch: int):
  """``images``/``labels`` in order in global batches of ``batch``, the last one padded with label
  -1 (one compiled shape); this process's rows of each (``batch // process_count`` of them)."""
  n, pad = len(labels), -len(labels) % batch
  local = batch // jax.process_count()
  first = jax.process_index() * local
  for start in range(0, n + pad, batch):
    rows = np.arange(start + first, start + first + local)
    valid = rows < n
    take = np.where(valid, rows, 0)
    yield {'image': np.where(valid[:, None, None, None], images[take], 0).astype(np.uint8),
           'label': np.where(valid, labels[take], -1).astype(np.int32)}


# ---------------------------------------------------------------------------------------------
# On-device preprocessing (pure jnp; jit- and vmap-friendly).

def normalize(images_u8, mean, std):
  """``(x/255 - mean)/std`` in float32 (the eval path)."""
  x = jnp.asarray(images_u8).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key, images_u8, mean, std, *, crop_pad=4, flip=True, cutout=0):
  """Random crop after zero padding, horizontal flip, normalisation, then optional cutout.

  Padding is applied to the uint8 pixels (padded pixels are 0 before normalisation, as in
  torchvision). Cutout zeroes a ``cutout`` x ``cutout`` square of all channels whose centre is
  uniform over the image, clipped at the borders.
  """
  x = jnp.asarray(images_u8)
  b, h, w, c = x.shape
  k_crop, k_flip, k_cut = jax.random.split(key, 3)
  if crop_pad > 0:
    p = crop_pad
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    oy, ox = jax.random.randint(k_crop, (2, b), 0, 2 * p + 1)
    crop = lambda img, y0, x0: jax.lax.dynamic_slice(img, (y0, x0, 0), (h, w, c))
    x = jax.vmap(crop)(padded, oy, ox)
  if flip:
    flipped = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(flipped[:, None, None, None], x[:, :, ::-1, :], x)
  x = normalize(x, mean, std)
  if cutout > 0:
    cy, cx = jax.random.randint(k_cut, (2, b), 0, jnp.array([[h], [w]]))
    y0, x0 = cy - cutout // 2, cx - cutout // 2
    rows, cols = jnp.arange(h), jnp.arange(w)
    in_y = (rows[None] >= y0[:, None]) & (rows[None] < y0[:, None] + cutout)
    in_x = (cols[None] >= x0[:, None]) & (cols[None] < x0[:, None] + cutout)
    hole = in_y[:, :, None, None] & in_x[:, None, :, None]
    x = jnp.where(hole, 0.0, x)
  return x


_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                np.float32)


def color_jitter(key, images_u8, mean, std, strength=0.4, hue=0.2, flip=True):
  """ImageNet training colour augmentation on already cropped uint8 images: horizontal flip,
  then brightness, contrast and saturation factors uniform in ``[1-strength, 1+strength]`` and a
  hue rotation uniform in ``[-hue, hue]`` turns (a rotation of the YIQ chroma plane), then
  normalisation. Per image, in this fixed order."""
  x = jnp.asarray(images_u8).astype(jnp.float32) / 255.0
  b = x.shape[0]
  k_flip, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
  if flip:
    x = jnp.where(jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1)), x[:, :, ::-1, :], x)
  factor = lambda k: jax.random.uniform(k, (b, 1, 1, 1), minval=1 - strength,
                                        maxval=1 + strength)
  gray = lambda im: jnp.sum(im * jnp.asarray([0.299, 0.587, 0.114]), -1, keepdims=True)
  x = jnp.clip(x * factor(k_b), 0, 1)
  x = jnp.clip(gray(x).mean(axis=(1, 2), keepdims=True) + factor(k_c) * (x - gray(x).mean(
      axis=(1, 2), keepdims=True)), 0, 1)
  x = jnp.clip(gray(x) + factor(k_s) * (x - gray(x)), 0, 1)
  if hue > 0:
    theta = 2 * jnp.pi * jax.random.uniform(k_h, (b,), minval=-hue, maxval=hue)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.stack([jnp.stack([jnp.ones_like(cos), 0 * cos, 0 * cos], -1),
                     jnp.stack([0 * cos, cos, -sin], -1),
                     jnp.stack([0 * cos, sin, cos], -1)], -2)  # (b, 3, 3)
    m = jnp.einsum('ij,bjk,kl->bil', jnp.linalg.inv(_YIQ), rot, _YIQ)
    x = jnp.clip(jnp.einsum('bhwc,bdc->bhwd', x, m), 0, 1)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)

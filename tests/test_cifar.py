"""CIFAR without TensorFlow: archives in the official binary layout, written here, served from
file:// URLs or a fake server (never the network); checksums, resumed downloads, the cache."""
import dataclasses
import hashlib
import io
import logging
import re
import tarfile
import urllib.error
import urllib.request

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from prnas_jax import cifar, data
from prnas_jax.errors import UserError


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))  # never the real ~/.cache


def _config(dataset='cifar10', download=True, tfds_data_dir=None, tmp=None):
  return ml_collections.ConfigDict({'dataset': dataset, 'download': download,
                                    'tfds_data_dir': tfds_data_dir or str(tmp / 'tfds')})


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def _archive(folder, name, per_class=2):
  """``folder/<official file name>``: a tar.gz in the official binary layout of ``name`` with
  ``per_class`` random images of every class in each split (CIFAR-100: a random coarse label
  before the class); returns its path and ``{split: (images, labels)}`` as written."""
  a = cifar.ARCHIVES[name]
  classes = data.NUM_CLASSES[name]
  rng = np.random.default_rng(classes)
  written = {}
  path = folder / a.filename
  folder.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, 'w:gz') as tar:
    for split, members in a.members.items():
      n = per_class * classes
      labels = rng.permutation(np.arange(n) % classes).astype(np.int32)
      images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
      heads = [rng.integers(0, 20, n), labels][-a.label_bytes:]
      rows = np.concatenate([np.stack(heads, 1).astype(np.uint8),
                             images.transpose(0, 3, 1, 2).reshape(n, -1)], 1)
      for member, chunk in zip(members, np.array_split(rows, len(members))):
        _add(tar, member, chunk.tobytes())
      written[split] = (images, labels)
    _add(tar, members[0].split('/')[0] + '/readme.html', b'<html>not a batch</html>')
  return path, written


def _official(monkeypatch, path, url=None):
  """Makes ``path`` the official archive of its data set (URL, size, sha256)."""
  name = next(n for n, a in cifar.ARCHIVES.items() if a.filename == path.name)
  monkeypatch.setitem(cifar.ARCHIVES, name, dataclasses.replace(
      cifar.ARCHIVES[name], url=url or path.as_uri(), size=path.stat().st_size,
      sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


def _serve_files(monkeypatch, path):
  """The archive at ``path`` as the official one, fetched from its file:// URL."""
  _official(monkeypatch, path)
  monkeypatch.setattr(cifar, 'urlopen', urllib.request.urlopen)


class _Response(io.BytesIO):
  def __init__(self, payload, headers, fail):
    super().__init__(payload)
    self.headers, self.fail = headers, fail

  def read(self, n=-1):
    chunk = super().read(n)
    if not chunk and self.fail:
      raise ConnectionResetError(104, 'Connection reset by peer')
    return chunk


class _Server:
  """An opener serving ``payload`` that honours HTTP Range; with ``cut``, the connection breaks
  after byte ``cut``. Records the Range header of every request."""

  def __init__(self, payload, cut=None):
    self.payload, self.cut, self.ranges = payload, cut, []

  def __call__(self, request, timeout):
    assert 0 < timeout <= 15
    asked = request.get_header('Range')
    self.ranges.append(asked)
    start = int(re.fullmatch(r'bytes=(\d+)-', asked).group(1)) if asked else 0
    n = len(self.payload)
    headers = {'Content-Range': f'bytes {start}-{n - 1}/{n}'} if asked else {}
    return _Response(self.payload[start:self.cut], headers, self.cut is not None)


def _one_line_error(fn, *args, match=None):
  with pytest.raises(UserError, match=match) as err:
    fn(*args)
  assert '\n' not in str(err.value)
  return str(err.value)


def _assert_split(split, images, labels, classes):
  np.testing.assert_array_equal(split.images, images)
  np.testing.assert_array_equal(split.labels, labels)
  assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
  assert split.num_classes == classes


def _downloads(tmp_path):
  return tmp_path / 'xdg' / 'prnas_jax' / 'downloads'


def _cache(tmp_path):
  return tmp_path / 'xdg' / 'prnas_jax' / 'cifar'


def test_cifar10_downloaded_once_converted_and_cached(tmp_path, monkeypatch, caplog):
  path, written = _archive(tmp_path / 'server', 'cifar10')
  _serve_files(monkeypatch, path)
  monkeypatch.setattr(data, '_load_tfds', None)  # no tfds folder: tfds is not asked
  with caplog.at_level(logging.INFO, logger='prnas_jax'):
    train = data.load_split(_config(tmp=tmp_path), 'train')
  _assert_split(train, *written['train'], 10)
  assert len(train) == 20 and train.images.shape == (20, 32, 32, 3)
  assert re.search(r'downloading cifar10: .* \(100%\)', caplog.text)
  assert (_downloads(tmp_path) / path.name).read_bytes() == path.read_bytes()
  assert not list(_downloads(tmp_path).glob('*.part'))
  assert sorted(p.name for p in _cache(tmp_path).iterdir()) == [
      data._cifar_cache('cifar10', 'test'), data._cifar_cache('cifar10', 'train')]

  monkeypatch.setattr(cifar, 'prepare', None)  # would fail if called: both splits are cached
  _assert_split(data.load_split(_config(tmp=tmp_path), 'test'), *written['test'], 10)
  _assert_split(data.load_split(_config(tmp=tmp_path), 'train'), *written['train'], 10)


def test_cifar100_reads_the_fine_label(tmp_path, monkeypatch):
  path, written = _archive(tmp_path / 'server', 'cifar100', per_class=1)
  _serve_files(monkeypatch, path)
  _assert_split(data.load_split(_config('cifar100', tmp=tmp_path), 'test'), *written['test'], 100)


def test_a_prepared_tfds_copy_is_used_first(tmp_path, monkeypatch):
  monkeypatch.setattr(cifar, 'prepare', None)  # would fail if called
  (tmp_path / 'tfds' / 'cifar10').mkdir(parents=True)  # mock_data fakes the copy's content
  with tfds.testing.mock_data(num_examples=4):
    s = data.load_split(_config(tmp=tmp_path), 'train')
  assert s.images.shape == (4, 32, 32, 3) and s.num_classes == 10


def test_a_download_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
  path, _ = _archive(tmp_path / 'server', 'cifar10')
  _serve_files(monkeypatch, path)
  a = cifar.ARCHIVES['cifar10']
  monkeypatch.setitem(cifar.ARCHIVES, 'cifar10', dataclasses.replace(a, sha256='0' * 64))
  msg = _one_line_error(data.load_split, _config(tmp=tmp_path), 'train',
                        match='is not the official archive')
  assert f'(sha256 {a.sha256}, not {"0" * 64}): rerun the same command to download it again' in msg
  monkeypatch.setitem(cifar.ARCHIVES, 'cifar10', dataclasses.replace(a, size=a.size - 1))
  msg = _one_line_error(data.load_split, _config(tmp=tmp_path), 'train',
                        match='is not the official archive')
  assert f'({a.size} bytes, not {a.size - 1})' in msg
  assert not list(_downloads(tmp_path).iterdir()) or [
      p.name for p in _downloads(tmp_path).iterdir()] == ['.cifar10.lock']  # nothing kept
  assert not _cache(tmp_path).exists()


def test_a_corrupt_archive_in_the_downloads_folder_is_refused(tmp_path):
  archive = _downloads(tmp_path) / 'cifar-10-binary.tar.gz'
  archive.parent.mkdir(parents=True)
  archive.write_bytes(b'\x1f\x8b not really the archive')
  for download in (True, False):  # never downloaded over: the file is the user's
    msg = _one_line_error(data.load_split, _config(download=download, tmp=tmp_path), 'train')
    assert msg == (f'{archive} is not the official archive (25 bytes, not 170052171): delete it '
                   'to download it again, or replace it with the file from '
                   'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz')
  assert archive.exists() and not _cache(tmp_path).exists()


def test_an_interrupted_download_resumes(tmp_path, monkeypatch):
  path, written = _archive(tmp_path / 'server', 'cifar10', per_class=40)
  _official(monkeypatch, path, url='https://cifar.example/cifar-10-binary.tar.gz')
  payload, cut = path.read_bytes(), 70000
  monkeypatch.setattr(cifar, 'urlopen', _Server(payload, cut))
  msg = _one_line_error(data.load_split, _config(tmp=tmp_path), 'train', match='stopped at')
  assert msg.endswith('(ConnectionResetError: [Errno 104] Connection reset by peer): rerun the '
                      'same command to resume it')
  part = _downloads(tmp_path) / 'cifar-10-binary.tar.gz.part'
  assert part.read_bytes() == payload[:cut]
  assert not (_downloads(tmp_path) / path.name).exists() and not _cache(tmp_path).exists()

  server = _Server(payload)
  monkeypatch.setattr(cifar, 'urlopen', server)
  _assert_split(data.load_split(_config(tmp=tmp_path), 'train'), *written['train'], 10)
  assert server.ranges == [f'bytes={cut}-']
  assert not part.exists()


def test_a_server_without_ranges_restarts_the_download(tmp_path, monkeypatch):
  path, written = _archive(tmp_path / 'server', 'cifar10')
  _serve_files(monkeypatch, path)  # file:// ignores Range: the whole file comes again
  part = _downloads(tmp_path) / 'cifar-10-binary.tar.gz.part'
  part.parent.mkdir(parents=True)
  part.write_bytes(b'stale bytes of an earlier try')
  _assert_split(data.load_split(_config(tmp=tmp_path), 'test'), *written['test'], 10)
  assert (_downloads(tmp_path) / path.name).read_bytes() == path.read_bytes()


def test_a_half_written_cache_is_never_read(tmp_path, monkeypatch):
  path, written = _archive(tmp_path / 'server', 'cifar10')
  _serve_files(monkeypatch, path)

  def killed(f, **arrays):  # the process dies halfway through writing the first split
    f.write(b'PK\x03\x04 half of an npz')
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(data.np, 'savez', killed)
    with pytest.raises(KeyboardInterrupt):
      data.load_split(_config(tmp=tmp_path), 'train')
  assert not list(_cache(tmp_path).iterdir())  # the temporary file went with it
  monkeypatch.setattr(cifar, 'urlopen', None)  # the archive was kept: no second download
  _assert_split(data.load_split(_config(tmp=tmp_path), 'train'), *written['train'], 10)
  # A cache file cut short by something else is decoded again, not trusted.
  npz = _cache(tmp_path) / data._cifar_cache('cifar10', 'test')
  npz.write_bytes(npz.read_bytes()[:5000])
  _assert_split(data.load_split(_config(tmp=tmp_path), 'test'), *written['test'], 10)


def test_no_download_when_switched_off(tmp_path, monkeypatch):
  msg = _one_line_error(data.load_split, _config(download=False, tmp=tmp_path), 'train')
  folder = _downloads(tmp_path)
  assert msg == (f'cifar10 has no prepared tfds copy under {tmp_path}/tfds and data.download is '
                 'False: pass --config.data.download=True, copy cifar-10-binary.tar.gz (from '
                 f'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz) into {folder}/, or '
                 'use --config.data.dataset=folder --config.data.folder=ROOT with the images in '
                 'ROOT/<split>/<class>/*.jpg')
  (tmp_path / 'tfds' / 'cifar10').mkdir(parents=True)  # a tfds folder, but nothing prepared
  assert _one_line_error(data.load_split, _config(download=False, tmp=tmp_path), 'train') == msg
  path, written = _archive(folder, 'cifar10')  # the archive copied by hand is used
  _official(monkeypatch, path)
  _assert_split(data.load_split(_config(download=False, tmp=tmp_path), 'test'),
                *written['test'], 10)


def test_no_internet_fails_at_once(tmp_path, monkeypatch):
  def offline(request, timeout):
    assert timeout == cifar.TIMEOUT_S
    raise urllib.error.URLError(OSError(-3, 'Temporary failure in name resolution'))

  monkeypatch.setattr(cifar, 'urlopen', offline)
  msg = _one_line_error(data.load_split, _config('cifar100', tmp=tmp_path), 'train')
  assert msg.startswith('cannot download cifar100 (URLError: [Errno -3] Temporary failure in '
                        'name resolution): copy cifar-100-binary.tar.gz (from '
                        'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz) into ')
  assert msg.endswith('or use --config.data.dataset=folder --config.data.folder=ROOT with the '
                      'images in ROOT/<split>/<class>/*.jpg')

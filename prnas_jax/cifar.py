"""CIFAR-10 and CIFAR-100 without TensorFlow: the official binary archives, the files and
checksums that tensorflow-datasets 4.9.10 records (``url_checksums/cifar10.txt``,
``cifar100.txt``), downloaded once (resumed after an interruption), checked, and read as
fixed-size records (no pickles). ``data.load_split`` caches the splits as ``.npz``."""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from prnas_jax.errors import UserError
from prnas_jax.metrics import log

urlopen = urllib.request.urlopen  # the only way out to the network (tests replace it)
TIMEOUT_S = 15  # for connecting and for every read: a machine without internet fails at once
SIDE = 32
_CHUNK = 1 << 20
_MIB = float(1 << 20)


@dataclasses.dataclass(frozen=True)
class Archive:
  """An official CIFAR archive: where it is, its size and sha256, and its record layout."""
  url: str
  size: int
  sha256: str
  members: dict  # split -> the tar members holding its records, in order
  label_bytes: int  # bytes before each 32x32x3 image (CIFAR-100: coarse, fine label)
  label_index: int  # which of them is the class

  @property
  def filename(self) -> str:
    return self.url.rsplit('/', 1)[1]


ARCHIVES = {
    'cifar10': Archive(
        'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz', 170052171,
        'c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd',
        {'train': tuple(f'cifar-10-batches-bin/data_batch_{i}.bin' for i in range(1, 6)),
         'test': ('cifar-10-batches-bin/test_batch.bin',)}, 1, 0),
    'cifar100': Archive(
        'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz', 168513733,
        '58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec',
        {'train': ('cifar-100-binary/train.bin',), 'test': ('cifar-100-binary/test.bin',)}, 2, 1),
}


def ways_out(name: str, folder: Path) -> str:
  """The fixes for a machine that cannot download ``name``: the archive copied by hand, or an
  image folder."""
  archive = ARCHIVES[name]
  return (f'copy {archive.filename} (from {archive.url}) into {folder}/, or use '
          '--config.data.dataset=folder --config.data.folder=ROOT with the images in '
          'ROOT/<split>/<class>/*.jpg')


def prepare(name: str, folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{split: (uint8 images (N, 32, 32, 3), int32 labels (N,))}`` of ``name`` in the archive's
  order, from ``folder/<archive>``, which is downloaded first if it is missing."""
  archive = ARCHIVES[name]
  path = folder / archive.filename
  if not path.exists():
    part = path.with_name(path.name + '.part')
    folder.mkdir(parents=True, exist_ok=True)
    _download(name, archive, part)
    try:
      _check(archive, part, f'the download of {name} from {archive.url}', 'rerun the same '
             'command to download it again')
    except UserError:
      part.unlink()  # the next run starts afresh
      raise
    part.replace(path)
  else:
    _check(archive, path, str(path), 'delete it to download it again, or replace it with the '
           f'file from {archive.url}')
  log.info(f'preparing {name} from {path}')
  return read(path, archive)


def read(path: Path, archive: Archive) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The splits of a checked ``archive`` at ``path``, in one pass over the tar stream."""
  raw = {}
  wanted = {m for members in archive.members.values() for m in members}
  with tarfile.open(path, 'r:gz') as tar:
    for member in tar:
      if member.name in wanted:
        raw[member.name] = tar.extractfile(member).read()
  record = archive.label_bytes + 3 * SIDE * SIDE
  out = {}
  for split, members in archive.members.items():
    rows = np.frombuffer(b''.join(raw[m] for m in members), np.uint8).reshape(-1, record)
    images = rows[:, archive.label_bytes:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    out[split] = (np.ascontiguousarray(images), rows[:, archive.label_index].astype(np.int32))
  return out


def _check(archive: Archive, path: Path, what: str, fix: str) -> None:
  """A one-line UserError naming ``what`` and ``fix`` unless ``path`` has the archive's size
  and sha256."""
  size = path.stat().st_size
  digest = hashlib.sha256()
  if size == archive.size:
    with open(path, 'rb') as f:
      while chunk := f.read(_CHUNK):
        digest.update(chunk)
    if digest.hexdigest() == archive.sha256:
      return
  got = (f'sha256 {digest.hexdigest()}, not {archive.sha256}' if size == archive.size
         else f'{size} bytes, not {archive.size}')
  raise UserError(f'{what} is not the official archive ({got}): {fix}')


def _download(name: str, archive: Archive, part: Path) -> None:
  """Fetches ``archive`` into ``part``, continuing a partial ``part`` where the server allows
  it (HTTP Range) and starting again where it does not; a progress line every 10 %."""
  have = part.stat().st_size if part.exists() else 0
  if have == archive.size:
    return  # complete, but stopped before it was checked
  have = have if have < archive.size else 0
  headers = {'Range': f'bytes={have}-'} if have else {}
  try:
    response = urlopen(urllib.request.Request(archive.url, headers=headers), timeout=TIMEOUT_S)
  except (OSError, http.client.HTTPException) as e:
    raise UserError(f'cannot download {name} ({_reason(e)}): '
                    f'{ways_out(name, part.parent)}') from None
  with response, open(part, 'ab') as f:
    if have and not re.match(rf'bytes {have}-', response.headers.get('Content-Range') or ''):
      have = 0  # the server sends the whole file
    f.truncate(have)
    log.info(f'downloading {name} from {archive.url} ({archive.size / _MIB:.1f} MiB'
             f'{f", resuming at {have / _MIB:.1f} MiB" if have else ""}) into {part.parent}')
    shown, start, resumed_at = 10 * have // archive.size, time.perf_counter(), have
    reason = 'the server closed the connection'  # unless reading fails first
    try:
      while chunk := response.read(_CHUNK):
        f.write(chunk)
        have += len(chunk)
        if 10 * have // archive.size > shown:
          shown = 10 * have // archive.size
          rate = (have - resumed_at) / _MIB / max(time.perf_counter() - start, 1e-9)
          log.info(f'downloading {name}: {have / _MIB:.1f} of {archive.size / _MIB:.1f} MiB '
                   f'({100 * have // archive.size}%), {rate:.1f} MiB/s')
    except (OSError, http.client.HTTPException) as e:
      reason = _reason(e)
    f.flush()
    os.fsync(f.fileno())  # what was fetched survives a crash (it is checked before use anyway)
    if have < archive.size:
      raise UserError(f'the download of {name} stopped at {have / _MIB:.1f} of '
                      f'{archive.size / _MIB:.1f} MiB ({reason}): rerun the same command to '
                      'resume it')


def _reason(e: BaseException) -> str:
  text = str(getattr(e, 'reason', None) or e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0]}' if text else type(e).__name__

"""Images that stay in their files: an ImageFolder split too large to hold as arrays (ImageNet: 1.28 M train
images, about 190 GB as uint8 at 224 x 224) is listed once by the prepare stage and decoded batch by batch.

:class:`FileImages` indexes like the uint8 tensor [N, 3, S, S] the in-memory path stores, decoding with the
same resize and centre crop (:func:`load_image`), so both paths give the same pixels. :class:`MappedImages` is a
lazy transform of it (the normaliser's), for code that slices a split into batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import DataError


def load_image(path: Path, size: int, crop_ratio: float) -> np.ndarray:
    """uint8 [3, size, size]: the shorter side resized (bilinear) to ``size / crop_ratio``, then the centre
    ``size`` x ``size`` (crop_ratio 0.875 at 224: torchvision's ImageNet evaluation, Resize(256) + CenterCrop(224))."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            short = max(size, round(size / crop_ratio))
            s = short / min(w, h)
            im = im.resize((max(short, round(w * s)), max(short, round(h * s))), Image.Resampling.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as err:
        raise DataError(f"cannot read image '{path}': {err}") from None


class FileImages:
    """uint8 images [N, 3, size, size] decoded from ``files`` when indexed (an int, a slice, or integer indices);
    a batch is decoded by ``threads`` threads (PIL releases the GIL while decoding and resizing)."""

    def __init__(self, files: Sequence[Path], size: int, crop_ratio: float, threads: int = 1):
        self.files = list(files)
        self.size, self.crop_ratio, self.threads = size, crop_ratio, max(1, threads)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.size, self.size)

    dtype = torch.uint8

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index) -> FileImages:
        """The images at ``index`` (integer indices), still undecoded."""
        return FileImages([self.files[i] for i in np.asarray(index, dtype=np.int64).tolist()], self.size,
                          self.crop_ratio, self.threads)

    def _decode(self, paths: list[Path]) -> np.ndarray:
        def one(p: Path) -> np.ndarray:
            return load_image(p, self.size, self.crop_ratio)

        if self.threads > 1 and len(paths) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
            arrays = list(self._pool.map(one, paths))
        else:
            arrays = [one(p) for p in paths]
        return np.stack(arrays) if arrays else np.empty((0, 3, self.size, self.size), np.uint8)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(self._decode([self.files[int(index)]])[0])
        if isinstance(index, slice):
            picked = self.files[index]
        else:
            picked = [self.files[i] for i in torch.as_tensor(index).reshape(-1).tolist()]
        return torch.from_numpy(self._decode(picked))

    def sample(self, n: int, seed: int) -> np.ndarray:
        """At most ``n`` images drawn without replacement (seeded), decoded: what statistics are measured on."""
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.permutation(len(self))[: min(n, len(self))])
        return self[torch.from_numpy(idx)].numpy()

    def __getstate__(self) -> dict:  # a thread pool does not pickle (DataLoader workers, torchrun)
        return {**self.__dict__, "_pool": None}


class MappedImages:
    """``fn`` applied to each batch taken from ``base`` (an int, a slice or indices), lazily: the normalised view
    of a :class:`FileImages` split. Supports what batch loops use: ``len``, ``shape``, indexing, ``split``."""

    def __init__(self, base: FileImages | MappedImages, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.base, self.fn = base, fn

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self.fn(self.base[slice(int(index), int(index) + 1)])[0]
        return self.fn(self.base[index])

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches of ``size`` images (``torch.Tensor.split``'s chunks)."""
        for i in range(0, len(self), size):
            yield self[i : i + size]


def is_streamed(x) -> bool:
    return isinstance(x, (FileImages, MappedImages))

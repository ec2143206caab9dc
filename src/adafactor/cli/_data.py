"""Byte corpora for the demo: the running Python's standard library sources, or the user's text.

Both optimizers must see the same bytes in the same order, so file order is sorted, the train /
validation split is fixed, and batches come from a generator seeded once per run.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Corpus", "DataError", "load_corpus", "train_batches", "val_batches"]

MAX_BYTES = 8 << 20  # reading more adds load time, not quality, at the demo's step counts
_BLOCK = 4096  # the split interleaves blocks so validation text resembles training text
_VAL_EVERY = 10  # every 10th block is validation: a fixed 10% split


class DataError(Exception):
    """The corpus could not be read or is too small; the message says what to do."""


@dataclass(frozen=True)
class Corpus:
    train: Tensor  # uint8 bytes
    val: Tensor
    source: str  # where the bytes came from, for the report
    files: int


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # site-packages lives under the stdlib folder and holds whatever the user installed.
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _user_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder; pass a text file or a folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise DataError(f"--data {path}: the folder holds no files; pass a folder of text files")
    return files


def _read_capped(files: list[Path], max_bytes: int) -> tuple[bytes, int]:
    chunks: list[bytes] = []
    total = 0
    for used, path in enumerate(files, start=1):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"cannot read {path}: {exc.strerror or exc}; check its permissions"
            ) from exc
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            return b"".join(chunks), used
    return b"".join(chunks), len(files)


def load_corpus(data: str | None, context: int, max_bytes: int = MAX_BYTES) -> Corpus:
    """Read ``data`` (a file or folder; None: the stdlib sources) and split it 90/10."""
    if data is None:
        files = _stdlib_files()
        source = f"Python standard library ({sysconfig.get_paths()['stdlib']})"
    else:
        files = _user_files(Path(data))
        source = str(data)
    raw, used = _read_capped(files, max_bytes)
    # Each split needs a window of context + 1 bytes (inputs plus shifted targets) to spare.
    needed = 2 * _VAL_EVERY * (context + 1)
    if len(raw) < needed:
        raise DataError(
            f"--data {source}: {len(raw)} bytes is too little text for --model-size context "
            f"{context}; give at least {needed} bytes"
        )
    # Small files get smaller blocks so that validation still gets its 10%.
    block = min(_BLOCK, len(raw) // (2 * _VAL_EVERY))
    blocks = torch.frombuffer(bytearray(raw), dtype=torch.uint8).split(block)
    is_val = [i % _VAL_EVERY == _VAL_EVERY - 1 for i in range(len(blocks))]
    corpus = Corpus(
        train=torch.cat([b for b, v in zip(blocks, is_val) if not v]),
        val=torch.cat([b for b, v in zip(blocks, is_val) if v]),
        source=source,
        files=used,
    )
    return corpus


def _windows(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    index = starts[:, None] + torch.arange(context + 1)
    chunk = data[index].long()
    return chunk[:, :-1], chunk[:, 1:]


def train_batches(
    corpus: Corpus, steps: int, batch_size: int, context: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """All training batches of a run, drawn up front so every optimizer gets the same ones."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus.train) - context, (steps, batch_size), generator=generator)
    return [_windows(corpus.train, row, context) for row in starts]


def val_batches(
    corpus: Corpus, windows: int, batch_size: int, context: int
) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set: ``windows`` windows spread evenly over the validation bytes."""
    count = min(windows, len(corpus.val) - context)
    starts = torch.linspace(0, len(corpus.val) - context - 1, count).long()
    return [_windows(corpus.val, part, context) for part in starts.split(batch_size)]

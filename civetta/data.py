"""Byte-level corpora (vocabulary 256) and deterministic batches.

A batch is a pure function of ``(seed, step, split)``: the whole global batch is drawn from its
own generator, and each data-parallel rank then takes its rows with ``shard_rows``. Every layout
of an experiment therefore sees exactly the same sequences at every step.

Corpora: the ``.py`` sources of Python's own standard library (present wherever Python is), any
text file, or a synthetic language of random words with a fixed successor structure.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256

SPLITS = {"train": 0, "val": 1}

# Directories of the standard library left out of the corpus: installed third-party packages
# (differ between machines), caches, and the test suites (large, repetitive, machine-generated
# data files).
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


class DataError(ValueError):
    """A corpus or batch request that cannot be served; the message is one line for the user."""


# ---- corpora ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int = 4_000_000) -> np.ndarray:
    """The standard library's ``.py`` files as one read-only uint8 array of at most max_bytes.

    Files are found recursively under ``sysconfig.get_paths()["stdlib"]``, skipping
    site-packages/dist-packages, ``__pycache__`` and test directories (``test``, ``tests``,
    ``idle_test``), taken in the order of their sorted relative POSIX paths, and joined with a
    blank line. The result is deterministic for a given Python installation.
    """
    if max_bytes < 2:
        raise DataError(f"stdlib corpus: max_bytes must be at least 2, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        rel = Path(dirpath).relative_to(root).as_posix()
        paths.extend(f"{rel}/{f}" if rel != "." else f for f in filenames if f.endswith(".py"))
    paths.sort()

    chunks: list[bytes] = []
    size = 0
    for rel_path in paths:  # stop reading as soon as the budget is spent
        if size >= max_bytes:
            break
        try:
            content = (root / rel_path).read_bytes()
        except OSError:
            continue  # an unreadable file (permissions, broken link) is simply not part of it
        chunks.append(content + b"\n\n")
        size += len(content) + 2
    if size < 2:
        raise DataError(f"stdlib corpus: no readable .py files under {root}")
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def text_file_corpus(path: str | os.PathLike[str], block_size: int = 1) -> np.ndarray:
    """The file's bytes as uint8 (UTF-8 text expected; the model is byte-level, so any bytes go).

    Raises DataError when the file cannot be read or has fewer than ``block_size + 1`` bytes,
    the least that makes one (input, target) pair.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"text corpus {path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"text corpus {path}: is a directory, not a text file") from None
    except OSError as e:
        raise DataError(f"text corpus {path}: cannot read it ({e.strerror})") from None
    if len(raw) < block_size + 1:
        raise DataError(
            f"text corpus {path}: {len(raw)} bytes, too short for one block of {block_size}"
            f" (needs at least {block_size + 1})"
        )
    return np.frombuffer(raw, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def synthetic_corpus(seed: int, n_bytes: int = 1_000_000) -> np.ndarray:
    """A learnable synthetic language, deterministic by seed, as a read-only uint8 array.

    A vocabulary of 48 random lowercase words; each word may be followed by only 3 words of
    its own (a sparse Markov chain), one of which ends the sentence with ".\\n". A model first
    learns the spelling of words, then which words may follow which: the loss can fall well
    below that of uniform bytes (ln 256 ≈ 5.5) but never to zero.
    """
    if n_bytes < 2:
        raise DataError(f"synthetic corpus: n_bytes must be at least 2, got {n_bytes}")
    rng = np.random.default_rng([seed, 0x5EED])
    n_words, n_successors = 48, 3
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words = [
        letters[rng.integers(0, len(letters), size=rng.integers(2, 8))].tobytes() + b" "
        for _ in range(n_words)
    ]
    words[0] = b".\n"  # the end of a sentence
    successors = rng.integers(1, n_words, size=(n_words, n_successors))
    successors[1:, 0] = 0  # every word may end the sentence; a sentence is never empty
    table = successors.tolist()  # Python ints: the loop below is ~10x faster than on numpy

    # The shortest word has 2 bytes, so this many choices always cover n_bytes.
    choices = rng.integers(0, n_successors, size=n_bytes // 2 + 1).tolist()
    sequence: list[bytes] = []
    size, word = 0, 0
    for choice in choices:
        word = table[word][choice]
        sequence.append(words[word])
        size += len(words[word])
        if size >= n_bytes:
            break
    return np.frombuffer(b"".join(sequence)[:n_bytes], dtype=np.uint8)


# ---- batches ------------------------------------------------------------------------------------
class Dataset:
    """A token stream with a held-out validation split: the last ``val_fraction`` of it.

    Training windows are drawn from the first part only and validation windows from the last
    part only, so the two never share a token position.
    """

    def __init__(self, tokens: np.ndarray, val_fraction: float = 0.1, name: str = "corpus") -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise DataError(f"{name}: tokens must be a 1-D integer array, got {tokens.dtype}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"{name}: val_fraction must be in [0, 1), got {val_fraction}")
        n_val = round(len(tokens) * val_fraction)
        self.name = name
        self.val_fraction = val_fraction
        self.train = tokens[: len(tokens) - n_val]
        self.val = tokens[len(tokens) - n_val :]

    def split(self, split: str) -> np.ndarray:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'val'")

    def check_block_size(self, block_size: int) -> None:
        """Raise DataError unless both splits hold at least one window of ``block_size``."""
        for split in SPLITS:
            self._check_split(split, block_size)

    def _check_split(self, split: str, block_size: int) -> None:
        n = len(self.split(split))
        if n < block_size + 1:
            raise DataError(
                f"{self.name}: the {split} split has {n} tokens, too few for block_size"
                f" {block_size} (needs at least {block_size + 1})"
            )

    def batch(
        self, split: str, seed: int, step: int, batch_size: int, block_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets, int64 arrays of shape (batch_size, block_size); y is x shifted by 1.

        A pure function of its arguments: the offsets come from
        ``default_rng([seed, step, split_id])``, never from global random state.
        """
        tokens = self.split(split)
        if seed < 0 or step < 0:
            raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"need batch_size, block_size >= 1, got {batch_size}, {block_size}")
        self._check_split(split, block_size)
        n = len(tokens)
        rng = np.random.default_rng([seed, step, SPLITS[split]])
        offsets = rng.integers(0, n - block_size, size=batch_size)  # last start: n - block - 1
        window = offsets[:, None] + np.arange(block_size + 1)  # (B, T+1)
        tokens_bt = tokens[window].astype(np.int64)
        return np.ascontiguousarray(tokens_bt[:, :-1]), np.ascontiguousarray(tokens_bt[:, 1:])


def shard_rows(x: np.ndarray, index: int, count: int) -> np.ndarray:
    """Rows ``index*b/count : (index+1)*b/count`` of x (a view): one DP rank's part of a batch."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    rows = x.shape[0]
    if rows % count:
        raise ValueError(f"cannot split {rows} rows into {count} equal shards")
    per_shard = rows // count
    return x[index * per_shard : (index + 1) * per_shard]


def load_dataset(
    source: str, seed: int, block_size: int | None = None, val_fraction: float = 0.1
) -> Dataset:
    """``"stdlib"``, ``"synthetic"`` (generated from ``seed``) or a path to a text file.

    The two keywords win over files of the same name (write ``./stdlib`` for such a file). With
    ``block_size`` given, a corpus too short for it is rejected now rather than at the first batch.
    """
    if source == "stdlib":
        dataset = Dataset(stdlib_corpus(), val_fraction, name="stdlib corpus")
    elif source == "synthetic":
        dataset = Dataset(synthetic_corpus(seed), val_fraction, name="synthetic corpus")
    else:
        tokens = text_file_corpus(source, block_size or 1)
        dataset = Dataset(tokens, val_fraction, name=f"text corpus {source}")
    if block_size is not None:
        dataset.check_block_size(block_size)
    return dataset

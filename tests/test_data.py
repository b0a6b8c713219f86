"""Corpora and deterministic, layout-independent batches."""

from __future__ import annotations

import numpy as np
import pytest

from civetta.data import (
    DataError,
    Dataset,
    load_dataset,
    shard_rows,
    stdlib_corpus,
    synthetic_corpus,
    text_file_corpus,
)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset(stdlib_corpus(200_000))


# ---- corpora ----------------------------------------------------------------------------------
def test_stdlib_corpus_is_nonempty_deterministic_bytes():
    corpus = stdlib_corpus(300_000)
    assert corpus.dtype == np.uint8 and corpus.ndim == 1
    assert len(corpus) == 300_000
    assert not corpus.flags.writeable  # it is cached: callers must not change it
    stdlib_corpus.cache_clear()
    again = stdlib_corpus(300_000)
    assert again is not corpus and np.array_equal(again, corpus)
    assert b"def " in corpus.tobytes()
    # A smaller budget is a prefix of a larger one.
    assert np.array_equal(stdlib_corpus(1000), corpus[:1000])


def test_synthetic_corpus_is_deterministic_by_seed():
    a = synthetic_corpus(0, n_bytes=20_000)
    assert a.dtype == np.uint8 and len(a) == 20_000
    synthetic_corpus.cache_clear()
    assert np.array_equal(synthetic_corpus(0, n_bytes=20_000), a)
    assert not np.array_equal(synthetic_corpus(1, n_bytes=20_000), a)
    # A small language: few distinct words, far fewer than the bytes allow.
    words = set(a.tobytes().split())
    assert len(words) <= 48


def test_text_file_corpus(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")
    corpus = text_file_corpus(path)
    assert corpus.dtype == np.uint8
    assert corpus.tobytes() == "héllo wörld\n".encode()


def test_missing_text_file_raises_data_error_naming_the_path(tmp_path):
    path = tmp_path / "nowhere" / "missing.txt"
    with pytest.raises(DataError, match=r"missing\.txt") as info:
        text_file_corpus(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"missing\.txt"):
        load_dataset(str(path), seed=0)


def test_text_file_too_short_for_a_block(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc")
    with pytest.raises(DataError, match="too short"):
        text_file_corpus(path, block_size=8)
    # Long enough for the file check, but the validation split is too short for the block.
    path.write_text("x" * 40)
    with pytest.raises(DataError, match="val split"):
        load_dataset(str(path), seed=0, block_size=8)


def test_load_dataset_sources(tmp_path):
    assert load_dataset("stdlib", seed=0).train.dtype == np.uint8
    synthetic = load_dataset("synthetic", seed=3)
    assert np.array_equal(synthetic.train, synthetic_corpus(3)[: len(synthetic.train)])
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 20)
    text = load_dataset(str(path), seed=0, block_size=8)
    assert len(text.train) + len(text.val) == 200 and len(text.val) == 20


# ---- batches ----------------------------------------------------------------------------------
def test_batch_is_a_pure_function_of_seed_step_split(dataset):
    args = [(0, 5), (0, 2), (1, 5), (0, 5), (0, 2)]
    first = [dataset.batch("train", seed, step, 4, 16) for seed, step in args]
    state = np.random.get_state()[1].copy()
    again = [dataset.batch("train", seed, step, 4, 16) for seed, step in reversed(args)][::-1]
    assert np.array_equal(np.random.get_state()[1], state)  # global random state untouched
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.array_equal(first[0][0], first[3][0])


def test_different_steps_seeds_and_splits_differ(dataset):
    x0, _ = dataset.batch("train", 0, 0, 8, 32)
    assert not np.array_equal(x0, dataset.batch("train", 0, 1, 8, 32)[0])
    assert not np.array_equal(x0, dataset.batch("train", 1, 0, 8, 32)[0])
    assert not np.array_equal(x0, dataset.batch("val", 0, 0, 8, 32)[0])


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(1000, dtype=np.int64)  # distinct tokens reveal each row's position
    x, y = Dataset(tokens).batch("train", 0, 0, 8, 16)
    assert x.dtype == y.dtype == np.int64 and x.shape == y.shape == (8, 16)
    assert x.flags.c_contiguous and y.flags.c_contiguous
    assert np.array_equal(y, x + 1)  # consecutive positions, targets one ahead


def test_shard_rows_concatenate_to_the_global_batch(dataset):
    x, y = dataset.batch("train", 0, 3, 12, 8)
    for count in (1, 2, 3, 4, 6, 12):
        assert np.array_equal(np.concatenate([shard_rows(x, r, count) for r in range(count)]), x)
    assert np.array_equal(shard_rows(y, 1, 3), y[4:8])
    with pytest.raises(ValueError, match="12 rows into 5"):
        shard_rows(x, 0, 5)
    with pytest.raises(ValueError, match="out of range"):
        shard_rows(x, 3, 3)


def test_validation_split_is_disjoint_from_train():
    tokens = np.arange(1000, dtype=np.int64)
    data = Dataset(tokens, val_fraction=0.1)
    assert len(data.train) == 900 and len(data.val) == 100
    for step in range(20):
        xt, yt = data.batch("train", 0, step, 16, 32)
        xv, _ = data.batch("val", 0, step, 16, 32)
        assert xt.max() < 900 and yt.max() < 900  # targets too stay inside train
        assert xv.min() >= 900


def test_batch_errors(dataset):
    with pytest.raises(ValueError, match="unknown split"):
        dataset.batch("test", 0, 0, 2, 8)
    with pytest.raises(DataError, match="block_size 50"):
        Dataset(np.zeros(100, dtype=np.uint8)).batch("val", 0, 0, 2, 50)

"""Holding back the first images of a source: the rest is re-batched, nothing is lost or seen twice."""

import numpy as np
import pytest

from gprebn_edge.data.holdout import Head, WithoutHead, split_holdout
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import open_source


@pytest.fixture
def source(tmp_path):
    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1).repeat(4, 1).repeat(4, 2).repeat(3, 3)
    path = tmp_path / "a.npz"
    np.savez(path, images=images, labels=np.arange(50) % 10)
    return open_source(str(path), Preprocess(), shuffle=True, seed=3)


def _ids(batches):
    return [int(round(v * 255)) for b in batches for v in b.images[:, 0, 0, 0]]


@pytest.mark.parametrize("k,batch", [(7, 4), (16, 16), (1, 50), (20, 64)])
def test_held_back_and_rest_partition_the_source_in_order(source, k, batch):
    everything = _ids(source.batches(9))
    rest, held = split_holdout(source, k)
    assert _ids(held.batches(batch)) == everything[:k]
    assert _ids(held.batches(batch)) == everything[:k]  # read again, the same images: nothing is kept
    assert all(len(b.images) <= batch for b in held.batches(batch)) and len(held) == k and held.has_labels
    rest_batches = list(rest.batches(batch))
    assert _ids(rest_batches) == everything[k:]
    assert [len(b.images) for b in rest_batches[:-1]] == [batch] * (len(rest_batches) - 1)  # full batches
    labels = np.concatenate([b.labels for b in rest_batches])
    assert list(labels) == [i % 10 for i in everything[k:]]
    assert len(rest) == 50 - k and rest.has_labels
    assert rest.describe()["held_back"] == k and rest.fingerprint() == source.fingerprint()


def test_no_holdout_is_the_source_itself(source):
    rest, held = split_holdout(source, 0)
    assert rest is source and held is None


def test_head_of_a_short_source_is_all_of_it(source):
    assert len(_ids(Head(source, 80).batches(16))) == 50 and len(Head(source, 80)) == 50
    assert _ids(WithoutHead(source, 80).batches(8)) == []

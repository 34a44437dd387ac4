"""Keras 3's multi-worker gaps, worked around in one place.

`MultiWorkerModel` is a `keras.Model` that trains under
`tf.distribute.MultiWorkerMirroredStrategy`, where Keras 3 itself fails
(keras-team/keras#20585):

* it averages each step's logs across workers with a reduction over axis
  0, which fails for scalars: the logs are returned with shape [1];
* it builds the compiled metrics from the first distributed batch averaged
  across replicas, which fails too: they are built from one replica's
  batch, which has the same structure and dtypes.

On one worker (and under any other strategy) the model behaves as
`keras.Model`. Remove a workaround when the Keras version that fixes it is
pinned.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class MultiWorkerModel(keras.Model):
  """A `keras.Model` whose `fit` and `evaluate` run under
  MultiWorkerMirroredStrategy (see the module docstring)."""

  def _multi_worker(self) -> bool:
    strategy = self._distribute_strategy
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access

  def _worker_logs(self, logs):
    """Keras 3 averages step logs across workers with a reduction over
    axis 0, which fails for scalars (keras-team/keras#20585): under
    MultiWorkerMirroredStrategy the logs are returned with shape [1]."""
    if not self._multi_worker():
      return logs
    return {k: tf.reshape(v, [1]) for k, v in logs.items()}

  def train_step(self, data):
    return self._worker_logs(super().train_step(data))

  def test_step(self, data):
    return self._worker_logs(super().test_step(data))

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Builds the compiled metrics from one replica's first batch.

    Keras 3 averages the first distributed batch across replicas for this,
    which fails under MultiWorkerMirroredStrategy (keras-team/keras#20585);
    one replica's batch has the same structure and dtypes.
    """
    strategy = self._distribute_strategy
    if strategy is None or iterator is None:
      return super()._maybe_symbolic_build(iterator, data_batch)
    for _, _, it in iterator:
      data_batch = tf.nest.map_structure(
          lambda x: (strategy.experimental_local_results(x)[0]
                     if isinstance(x, tf.distribute.DistributedValues)
                     else x), next(it))
      break
    with strategy.scope():
      self._symbolic_build(data_batch=data_batch)

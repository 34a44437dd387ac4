"""tf.data pipelines over bytes of text, images and audio."""

from st_keras.data import audio
from st_keras.data import images
from st_keras.data import kinds
from st_keras.data import text
from st_keras.data.windows import evaluation_windows
from st_keras.data.windows import sequence_batches
from st_keras.data.windows import training_windows

__all__ = ["audio", "images", "kinds", "text", "evaluation_windows",
           "sequence_batches", "training_windows"]

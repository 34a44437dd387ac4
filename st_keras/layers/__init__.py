"""Keras layers of the Sparse Transformer."""

from st_keras.layers.attention import SparseSelfAttention
from st_keras.layers.attention import build_layout
from st_keras.layers.embeddings import AxialPositionEmbedding
from st_keras.layers.embeddings import text_axes
from st_keras.layers.residual import SparseTransformerBlock
from st_keras.layers.residual import sigmoid_gelu

__all__ = ["SparseSelfAttention", "build_layout", "AxialPositionEmbedding",
           "text_axes", "SparseTransformerBlock", "sigmoid_gelu"]

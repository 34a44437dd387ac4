"""Sparse attention patterns of the Sparse Transformer as block-sparse layouts.

A `Layout` says, for every head, which (query, key) token pairs attend. It is
stored the way the fused kernel consumes it: one or more *components*, each a
block-sparse structure over `block_size x block_size` tiles, optionally over a
permuted token order. Inside a component a tile is either full (no mask) or
partial (a `block_size x block_size` token mask, deduplicated in a small mask
table). Components of one layout are token-disjoint, so attention over the
layout is the log-sum-exp merge of attention over its components.

The strided pattern's stride part `A2(i) = {j <= i : (i - j) mod l == 0}` is
held in the transposed order of the paper's code: tokens are sorted by
`(i mod l, i div l)`, so each residue class is one contiguous chunk and A2 is
causal attention inside a chunk -- dense tiles instead of one key in every l.

Heads that share a pattern share its tables: a component's tables describe
`table_heads` T heads, T dividing the layout's heads, and head h reads table
head h % T (T = 1 for the local, causal, dense and strided patterns and the
fixed pattern with one summary pattern, whatever the number of heads).
Periodic patterns are built from a few tile signatures (sign of the block
offset, query and key phase) instead of all nb^2 candidate tiles, so the
fixed and strided patterns at n = 2^20 build in about a second.

Everything here is numpy; `to_dense()` is the token-level truth in original
order and is what tests compare against.

Public constructors: `fixed`, `strided`, `local`, `causal`, `dense`, `union`,
`per_head`, `from_mask`.

Modules: `structure` (Layout, Component, Tiles), `tiling` (tiles from token
predicates), `patterns` (the constructors), `combine` (union, per_head).
They import each other relatively and need numpy only, so that the package
also loads by path where importing st_keras would import TensorFlow
(tools/gpu_check.py on a GPU machine).
"""

from .combine import per_head
from .combine import union
from .patterns import causal
from .patterns import dense
from .patterns import fixed
from .patterns import from_mask
from .patterns import local
from .patterns import strided
from .structure import SUPPORTED_BLOCK_SIZES
from .structure import Component
from .structure import Layout
from .structure import Tiles

__all__ = ["Component", "Layout", "SUPPORTED_BLOCK_SIZES", "Tiles", "causal",
           "dense", "fixed", "from_mask", "local", "per_head", "strided",
           "union"]

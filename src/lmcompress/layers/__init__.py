"""Compressed replacements for dense linear layers.

Every layer here can be rebuilt empty from its manifest entry (so `lmcompress.load` can restore uneven
per-layer shapes before loading weights strictly) and can turn itself back into a dense layer.
"""

from lmcompress.layers.base import CompressedLayer, layer_from_manifest, register_layer
from lmcompress.layers.block_linear import LinearBlock
from lmcompress.layers.lowrank import LowRankLinear
from lmcompress.layers.quantized import QuantizedEmbedding, QuantizedLinear
from lmcompress.layers.sparse import SparseLinear

__all__ = ["CompressedLayer", "LinearBlock", "LowRankLinear", "QuantizedEmbedding", "QuantizedLinear", "SparseLinear",
           "layer_from_manifest", "register_layer"]

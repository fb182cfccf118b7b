"""Compressed replacements for dense linear layers.

Every layer here can be rebuilt empty from its manifest entry (so `lmcompress.load` can restore uneven
per-layer shapes before loading weights strictly) and can turn itself back into a dense layer.
"""

from lmcompress.layers.adapters import BottleneckAdapter, LoRALinear
from lmcompress.layers.base import CompressedLayer, layer_from_manifest, layer_types, register_layer
from lmcompress.layers.block_linear import LinearBlock
from lmcompress.layers.fourier import FourierMixing
from lmcompress.layers.kronecker import KroneckerLinear
from lmcompress.layers.lowrank import LowRankLinear
from lmcompress.layers.quantized import QuantizedEmbedding, QuantizedLinear
from lmcompress.layers.sparse import SparseLinear
from lmcompress.layers.tensor_train import TTLinear

__all__ = ["BottleneckAdapter", "CompressedLayer", "FourierMixing", "KroneckerLinear", "LinearBlock", "LoRALinear",
           "LowRankLinear", "QuantizedEmbedding", "QuantizedLinear", "SparseLinear", "TTLinear", "layer_from_manifest",
           "layer_types", "register_layer"]

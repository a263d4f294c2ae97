"""Weight-only quantization of the image encoder's Linear layers (MLX's affine ``QuantizedLinear``).

The encoder holds nearly all of SAM's weights (ViT-H: 632 M of 641 M parameters, ~90% in its Linear layers);
quantized to 8 or 4 bits they take ~a quarter or ~an eighth of float32's bytes, so ViT-H fits an 8 GB Mac.
Activations stay in the encoder's dtype; the small prompt encoder and mask decoder are left as they are.

Group size: 64 input values share a scale and an offset (MLX's default), or 32 for a layer whose input width
64 does not divide (TinyViT's 160-wide stage). Each group costs two values of the encoder's dtype: at 64, 1 bit
a weight in float32 (0.5 in half precision), at 32 twice that; 128 would halve it but let one outlier coarsen
twice as many weights, and does not divide every SAM width either.
"""

from __future__ import annotations

import mlx.nn as nn

GROUP_SIZE = 64
_SMALL_GROUP_SIZE = 32


def group_size(input_width: int) -> int:
    """The group size of a Linear layer with this many inputs: 64, or 32 where 64 does not divide it."""
    return GROUP_SIZE if input_width % GROUP_SIZE == 0 else _SMALL_GROUP_SIZE


def quantized_layout(encoder: nn.Module, bits: int) -> None:
    """Replace every Linear layer of ``encoder`` by a ``QuantizedLinear`` of ``bits`` bits (group size by its input
    width), unevaluated: the quantized weights (a quantized file's, or ``mx.quantize`` of a float file's as it is
    read, ``load.build_model``) are then loaded into it; the layers' random initial weights are never computed."""
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 8 or 4, got {bits!r}")
    for path, layer in encoder.named_modules():
        if type(layer) is nn.Linear:
            out_width, in_width = layer.weight.shape
            _replace(encoder, path, nn.QuantizedLinear(in_width, out_width, bias="bias" in layer,
                                                       group_size=group_size(in_width), bits=bits))


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set the sub-module at dotted ``path`` (list indices as numbers) of ``root`` to ``module``."""
    *parents, last = path.split(".")
    node = root
    for name in parents:
        node = node[int(name)] if isinstance(node, list) else node[name]
    if isinstance(node, list):
        node[int(last)] = module
    else:
        node[last] = module

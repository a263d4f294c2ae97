"""SAM's mask decoder: image tokens + prompt embeddings -> 4 candidate masks and their IoU scores.

Learned output tokens (one IoU token, four mask tokens) are prepended to the prompt
tokens and run through the two-way transformer with the image tokens. The image
tokens are then upscaled 4x by two transposed convolutions (the mask generator), and
each mask token, passed through its own hypernetwork MLP, is dot-multiplied with every
upscaled pixel to give that candidate's logits. An MLP on the IoU token predicts each
candidate's mask quality. The image tokens go through in row bands (``token_bands``):
on the CPU, one band per core.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import PromptDecoderConfig
from ..ops.layers import MLP, gelu, layer_norm_2d, on_cpu
from .prompt_encoder import MaskHint
from ..ops.bands import band_count, per_band, row_bands, top_left_bands
from .two_way_transformer import ImageSide, TwoWayTransformer


class PixelUpscale2x(nn.Module):
    """A 2x2, stride-2 transposed convolution, keeping each pixel's 2 x 2 output block apart.

    ... x I -> ... x 2 x 2 x O: each input pixel independently paints a 2 x 2 block, so the
    layer is one matmul to 4*O channels (MLX's general transposed conv is many times slower
    on the CPU). The block axes are left in place; ``interleave_blocks`` turns them into
    rows and columns once, on the final masks. Weight layout as ``nn.ConvTranspose2d``: O x 2 x 2 x I.
    """

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.weight = mx.zeros((out_chans, 2, 2, in_chans))
        self.bias = mx.zeros((out_chans,))

    def __call__(self, x: mx.array) -> mx.array:
        o, _, _, i = self.weight.shape
        y = x @ self.weight.transpose(3, 1, 2, 0).reshape(i, 4 * o)
        return y.reshape(*x.shape[:-1], 2, 2, o) + self.bias


class MaskUpscaler(nn.Module):
    """Image tokens B x h x w x D -> per-pixel features of the 4h x 4w mask grid (D/8 channels).

    Two stride-2 transposed convs with LayerNorm and GELU, all pixel-local, so the
    features stay in block layout B x h x w x 2 x 2 x 2 x 2 x D/8 (axes: coarse row and
    column offset, then fine ones) and only the final masks are interleaved, by
    ``interleave_blocks``; that skips reshuffling the 64- and 32-channel maps.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = PixelUpscale2x(dim, dim // 4)
        self.norm = layer_norm_2d(dim // 4)
        self.conv2 = PixelUpscale2x(dim // 4, dim // 8)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(self.conv2(gelu(self.norm(self.conv1(x)))))


def interleave_blocks(blocks: mx.array) -> mx.array:
    """B x h x w x 2 x 2 x 2 x 2 x C (from ``MaskUpscaler``) -> B x C x 4h x 4w.

    Pixel (4i + 2a + c, 4j + 2b + d) is blocks[:, i, j, a, b, c, d].
    """
    b, h, w = blocks.shape[:3]
    return blocks.transpose(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, blocks.shape[-1], 4 * h, 4 * w)


# On the CPU, prompts are decoded this many at a time, each group after the last: a prompt carries
# 4096 x 256 image-side floats through the transformer, and one prompt's stay in cache. Batching
# saves nothing else, and MLX evaluates independent groups interleaved, so all of them would be in
# flight at once (32 one-point prompts on the 2-core test machine, before row bands: ~35 ms per prompt one after
# another against ~45 ms in independent groups of 1, 2 or 4).
_CPU_PROMPT_GROUP = 1


class MaskDecoder(nn.Module):
    def __init__(self, config: PromptDecoderConfig):
        super().__init__()
        d = config.embed_dim
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = mx.zeros((1, d))
        self.mask_tokens = mx.zeros((self.num_mask_tokens, d))
        self.transformer = TwoWayTransformer(
            config.transformer_depth, d, config.transformer_heads, config.transformer_mlp_dim
        )
        self.upscaler = MaskUpscaler(d)
        self.hypernetworks = [MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens)]
        self.iou_head = MLP(d, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)

    def __call__(
        self,
        image_tokens: mx.array,
        image_pe: mx.array,
        sparse: mx.array,
        dense: mx.array | None,
        multimask_output: bool,
        image_side: ImageSide | None = None,
        read_grid: tuple[int, int] | None = None,
        hint: MaskHint | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Decode masks.

        image_tokens: 1 x h x w x D (one image, shared by the B prompts) or B x h x w x D;
        image_pe: h x w x D; sparse: B x N x D; dense: B x h x w x D, or None with ``image_side``.
        ``image_side``: ``project_image`` of these tokens, if the caller keeps it; it stands for ``dense`` being the
        "no mask" embedding, and ``dense`` goes unused. ``hint``: the prompts' mask hints
        (``PromptEncoder.mask_hint``), which then shift it.
        ``read_grid``: (rows, cols) to compute the masks of the top-left rows x cols tokens only (the mask
        generator is per token, so those equal the full masks' part); the whole grid if None.
        Returns low-res logits B x C x 4 rows x 4 cols and IoU predictions B x C, where C is 3
        (masks 1..3) with ``multimask_output`` and 1 (mask 0) without, as in the original.
        """
        b = sparse.shape[0]
        if b > _CPU_PROMPT_GROUP and on_cpu():
            groups: list[tuple[mx.array, mx.array]] = []
            given = {"sparse": sparse, "dense": dense, "hint": None if hint is None else hint.features}
            for i in range(0, b, _CPU_PROMPT_GROUP):
                part = slice(i, i + _CPU_PROMPT_GROUP)
                prompts = {key: x[part] for key, x in given.items() if x is not None}
                if groups:  # start after the previous group
                    prompts = dict(zip(prompts, mx.depends(list(prompts.values()), list(groups[-1]))))
                tokens = image_tokens if image_tokens.shape[0] == 1 else image_tokens[part]
                part_hint = None if hint is None else hint._replace(features=prompts["hint"])
                groups.append(self(tokens, image_pe, prompts["sparse"], prompts.get("dense"), multimask_output,
                                   image_side, read_grid, part_hint))
            return mx.concatenate([m for m, _ in groups]), mx.concatenate([q for _, q in groups])
        h, w, d = image_pe.shape
        out_tokens = mx.concatenate([self.iou_token, self.mask_tokens], axis=0)
        tokens = mx.concatenate([mx.broadcast_to(out_tokens[None], (b, *out_tokens.shape)), sparse], axis=1)
        bands = band_count() if image_side is None else len(image_side.image)
        pos = row_bands(image_pe[None], bands)
        if image_side is None:
            src = per_band(mx.add, row_bands(image_tokens, bands), row_bands(dense, bands))
        else:
            if hint is not None:
                image_side = self.transformer.layers[0].shift_image(
                    image_side, row_bands(hint.features, bands), hint.weight, hint.offset)
            src = image_side.image

        chosen = range(1, self.num_mask_tokens) if multimask_output else range(1)
        # the IoU token, then the chosen mask tokens: the other tokens' final attention is never read
        tokens, src = self.transformer(src, pos, tokens, image_side, outputs=[0, *(1 + i for i in chosen)])
        iou_out = tokens[:, 0]
        hyper = mx.stack([self.hypernetworks[i](tokens[:, 1 + j]) for j, i in enumerate(chosen)], axis=2)  # B x d/8 x C

        rows, cols = read_grid or (h, w)

        def band_masks(band: mx.array) -> mx.array:  # B x n x D -> B x n/cols x cols x 2 x 2 x 2 x 2 x C
            features = self.upscaler(band.reshape(b, -1, cols, d))  # B x n/cols x cols x 2 x 2 x 2 x 2 x d/8
            masks = features.reshape(b, -1, features.shape[-1]) @ hyper
            return masks.reshape(*features.shape[:-1], len(chosen))

        masks = interleave_blocks(mx.concatenate(per_band(band_masks, top_left_bands(src, w, rows, cols)), axis=1))
        return masks, self.iou_head(iou_out)[:, chosen.start : chosen.stop]

    def project_image(self, image_tokens: mx.array, image_pe: mx.array, no_mask: mx.array) -> ImageSide:
        """What the first transformer layer computes from the image alone, for prompts without a mask hint
        (``TwoWayAttentionBlock.shift_image`` adapts it to one).

        image_tokens: 1 x h x w x D, image_pe: h x w x D, no_mask: the prompt encoder's 1 x D "no mask" embedding.
        The result is in as many bands as ``band_count()`` gives now; decodes with it use the same.
        """
        bands = band_count()
        src = per_band(lambda band: band + no_mask, row_bands(image_tokens, bands))
        return self.transformer.layers[0].project_image(src, row_bands(image_pe[None], bands))

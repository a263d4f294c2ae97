"""Label Studio's brush RLE: a mask as the ``rle`` list of a ``brushlabels`` result.

Label Studio stores a brush mask as the RGBA pixels of the image (H x W x 4 bytes, row-major, the mask in every
channel: 255 inside, 0 outside; its decoders read the alpha channel) packed by thi.ng's ``rle-pack``: a bit stream,
most significant bit first, of

- a header: the number of values (32 bits), the word size minus 1 (5 bits: 8 bits here), four run-length field
  widths minus 1 (4 bits each);
- chunks until every value is written: a repeat flag (1 bit), which of the four widths the length field uses
  (2 bits), the run length minus 1 (that width), then one value (repeat) or that many values (literal);

padded with zero bits to whole bytes, given as a list of byte values. This module writes repeat chunks only (a
mask is long runs), vectorised over the runs, and reads any stream (tests and ``decode_brush``'s callers).
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 8
# Field widths for run lengths (1..16 bits: the header gives each in 4 bits): short runs cost few bits, one chunk
# holds up to 2 ** 16 values (16384 pixels).
LENGTH_BITS = (4, 8, 12, 16)
_HEADER_BITS = 32 + 5 + 4 * 4


def encode_brush(mask: np.ndarray) -> list[int]:
    """A H x W mask (nonzero: inside) -> Label Studio's brush RLE (list of byte values)."""
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"a brush mask must be a non-empty H x W array, got shape {mask.shape}")
    inside = np.asarray(mask).astype(bool).ravel()
    # Runs over pixels; each pixel is 4 equal values (R, G, B, A), so a run of n pixels is 4n values.
    edges = np.flatnonzero(inside[1:] != inside[:-1]) + 1
    starts = np.concatenate(([0], edges))
    lengths = np.diff(np.concatenate((starts, [inside.size]))) * 4
    values = np.where(inside[starts], 255, 0)
    # Runs longer than the widest field are split into full chunks and a remainder.
    widest = 1 << LENGTH_BITS[-1]
    pieces = -(-lengths // widest)
    values = np.repeat(values, pieces)
    lengths = np.repeat(lengths, pieces)
    last = np.cumsum(pieces) - 1
    lengths[np.arange(len(lengths)) != np.repeat(last, pieces)] = widest
    lengths[last] -= (pieces - 1) * widest
    # Each chunk as one field: repeat flag, width index, length - 1, value.
    kind = np.searchsorted(np.array([1 << b for b in LENGTH_BITS]), lengths)
    length_bits = np.array(LENGTH_BITS)[kind]
    fields = (((1 << 2 | kind) << length_bits | (lengths - 1)) << WORD_BITS) | values
    widths = 3 + length_bits + WORD_BITS
    header = ((inside.size * 4) << 5 | (WORD_BITS - 1)) << 16
    for number, bits in enumerate(LENGTH_BITS):
        header |= (bits - 1) << (12 - 4 * number)
    return _pack(np.concatenate(([header], fields)), np.concatenate(([_HEADER_BITS], widths)))


def decode_brush(rle: list[int] | bytes, width: int, height: int) -> np.ndarray:
    """Label Studio's brush RLE -> H x W bool mask (its alpha channel > 0); any rle-pack stream is read."""
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    position = 0

    def read(count: int) -> int:
        nonlocal position
        if position + count > bits.size:
            raise ValueError(f"brush RLE ends early: {bits.size} bits, {position + count} needed")
        value = int("".join(map(str, bits[position : position + count])) or "0", 2)
        position += count
        return value

    count, word = read(32), read(5) + 1
    length_bits = [read(4) + 1 for _ in range(4)]
    if count != width * height * 4:
        raise ValueError(f"brush RLE holds {count} values, a {width}x{height} RGBA image has {width * height * 4}")
    out = np.zeros(count, dtype=np.uint32)
    done = 0
    while done < count:
        repeat = read(1)
        end = min(done + 1 + read(length_bits[read(2)]), count)
        if repeat:
            out[done:end] = read(word)
        else:
            out[done:end] = [read(word) for _ in range(end - done)]
        done = end
    return out.reshape(height, width, 4)[:, :, 3] > 0


def _pack(values: np.ndarray, widths: np.ndarray) -> list[int]:
    """Fields (value, width in bits) written most significant bit first, padded to bytes."""
    values = values.astype(np.uint64)
    owner = np.repeat(np.arange(len(values)), widths)
    shift = (np.repeat(widths + np.cumsum(np.concatenate(([0], widths[:-1]))), widths) - 1
             - np.arange(int(widths.sum())))
    bits = (values[owner] >> shift.astype(np.uint64)) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8)).tolist()

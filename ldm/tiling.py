"""Memory-bounded VAE decoding: overlapping latent tiles cross-faded together, and batch slicing.

The decoder's working memory grows with the image area: at 2048x2048 its full-resolution levels hold
128- and 256-channel float32 maps of 2-4 GB each, several at a time. Decoding overlapping latent tiles bounds
it by the tile size instead. The result is close to, not equal to, the plain decode: inside a tile the
decoder's GroupNorm statistics and its mid-block attention see that tile rather than the whole image, so two
neighbouring tiles disagree a little where they overlap. Each tile's weight therefore ramps linearly from
~0 at an edge shared with a neighbour to 1 across the overlap, and the output is the weight-normalised sum,
so the tiles cross-fade instead of meeting at a visible seam (the scheme of diffusers'
AutoencoderKL.tiled_decode; MultiDiffusion, Bar-Tal et al. 2023, fuses overlapping windows the same way).
Edges on the image border keep weight 1. scripts/bench.py measures the difference from the plain decode.

Opt-in: call `decode_tiled` directly, or `enable_tiled_decode(vae)` so that `vae.decode` (and with it the
pipeline) decodes tile by tile.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn


def upsampling_factor(vae: nn.Module) -> int:
    """Pixels per latent along each axis: 2 per upsampling level of the decoder (8 for Stable Diffusion)."""
    return 2 ** sum(hasattr(level, "upsample") for level in vae.decoder.up)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), spread evenly so that neighbours overlap
    by at least `overlap` (and the last tile ends exactly at `size`)."""
    if size <= tile:
        return [0]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, ramp_in: int, ramp_out: int) -> torch.Tensor:
    """Weights along one axis of a tile: (i + 0.5) / ramp_in rising over the first ramp_in samples, the mirror
    falling over the last ramp_out, 1 in between; ramp 0 means an image border (weight 1 up to the edge).
    Two overlapping neighbours with equal ramps sum to exactly 1 over their overlap."""
    i = torch.arange(length, dtype=torch.float64) + 0.5
    w = torch.ones(length, dtype=torch.float64)
    if ramp_in:
        w = torch.minimum(w, i / ramp_in)
    if ramp_out:
        w = torch.minimum(w, (length - i) / ramp_out)
    return w.to(torch.float32)


def _axis_tiles(size: int, tile: int, overlap: int, f: int) -> list[tuple[slice, slice, torch.Tensor]]:
    """(latent slice, pixel slice, pixel weights) per tile along one axis."""
    starts = tile_starts(size, tile, overlap)
    length = min(tile, size)
    out = []
    for k, s in enumerate(starts):
        ramp_in = (starts[k - 1] + length - s) * f if k > 0 else 0
        ramp_out = (s + length - starts[k + 1]) * f if k + 1 < len(starts) else 0
        out.append((slice(s, s + length), slice(s * f, (s + length) * f), _ramp(length * f, ramp_in, ramp_out)))
    return out


@torch.no_grad()
def decode_tiled(vae: nn.Module, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """`vae.decode(z)` computed on overlapping (tile x tile)-latent windows, cross-faded (see module doc).

    z: (B, C, h, w) UNSCALED latents; `tile` and `overlap` in latent pixels (64 and 16: 512 px windows with
    128 px of cross-fade). Peak memory is that of decoding one tile, plus the float32 output."""
    if not 0 <= 2 * overlap <= tile:
        raise ValueError(f"need 0 <= 2 * overlap <= tile, got tile={tile}, overlap={overlap}")
    plain_decode = type(vae).decode  # the class's own decode, also when enable_tiled_decode replaced it
    f = upsampling_factor(vae)
    b, _, h, w = z.shape
    out = weight = None
    for lat_y, pix_y, w_y in _axis_tiles(h, tile, overlap, f):
        for lat_x, pix_x, w_x in _axis_tiles(w, tile, overlap, f):
            piece = plain_decode(vae, z[:, :, lat_y, lat_x]).float()
            if out is None:
                out = piece.new_zeros(b, piece.shape[1], h * f, w * f)
                weight = piece.new_zeros(1, 1, h * f, w * f)
            tile_weight = (w_y[:, None] * w_x[None, :]).to(piece.device)
            out[:, :, pix_y, pix_x] += piece * tile_weight
            weight[:, :, pix_y, pix_x] += tile_weight
            del piece
    return (out / weight).to(z.dtype if z.is_floating_point() else torch.float32)


@torch.no_grad()
def decode_sliced(vae: nn.Module, z: torch.Tensor, slice_size: int = 1) -> torch.Tensor:
    """`vae.decode(z)` for `slice_size` samples at a time: peak memory of a smaller batch, same values."""
    plain_decode = type(vae).decode
    return torch.cat([plain_decode(vae, part) for part in z.split(slice_size)])


def _decode_in_pieces(self, z: torch.Tensor) -> torch.Tensor:
    tile, overlap, slice_size = self._decode_options
    parts = z.split(slice_size) if slice_size else (z,)
    if tile is None:
        return torch.cat([type(self).decode(self, part) for part in parts])
    return torch.cat([decode_tiled(self, part, tile, overlap) for part in parts])


def enable_tiled_decode(vae: nn.Module, tile: int | None = 64, overlap: int = 16, slice_size: int | None = None
                        ) -> nn.Module:
    """Make `vae.decode` decode tile by tile (tile=None: whole latents) and `slice_size` samples at a time
    (None: the whole batch); in place, returns `vae`.

    The override is an instance attribute bound to `vae`, so copies (copy.deepcopy, as the pipeline's float32
    retry makes) keep it; `disable_tiled_decode` removes it."""
    if tile is not None and not 0 <= 2 * overlap <= tile:
        raise ValueError(f"need 0 <= 2 * overlap <= tile, got tile={tile}, overlap={overlap}")
    vae._decode_options = (tile, overlap, slice_size)
    vae.decode = types.MethodType(_decode_in_pieces, vae)
    return vae


def disable_tiled_decode(vae: nn.Module) -> nn.Module:
    vae.__dict__.pop("decode", None)
    vae.__dict__.pop("_decode_options", None)
    return vae

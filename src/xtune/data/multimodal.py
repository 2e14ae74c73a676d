"""InternVL image tiling: how many tokens an image costs, and its pixel tiles.

An image is resized onto a grid of `cols x rows` square tiles of `image_size` px, the grid
(1 to `max_tiles` tiles) being the one whose aspect ratio is closest to the image's; on a tie
the larger grid wins while the image covers more than half of it. With more than one tile a
thumbnail (the whole image resized to one tile) is appended. Each tile becomes
`tokens_per_tile` `<IMG_CONTEXT>` tokens between `<img>` and `</img>`.

Token counts come from the image size alone, so tokenisation never decodes an image; pixels
are read only when a batch is built (`load_tiles`).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from PIL import Image, UnidentifiedImageError

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

# InternVL normalises with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=64)
def _grids(max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with 1 <= cols*rows <= max_tiles, fewest tiles first."""
    grids = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def tile_grid(width: int, height: int, image_size: int, max_tiles: int) -> tuple[int, int]:
    """The (cols, rows) grid InternVL picks for an image of this size."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _grids(max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, image_size: int, max_tiles: int, use_thumbnail: bool) -> int:
    cols, rows = tile_grid(width, height, image_size, max_tiles)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def image_size_of(path: str) -> tuple[int, int]:
    """(width, height) from the file header; PIL does not decode the pixels for this."""
    with Image.open(path) as im:
        return im.size


# The last bytes of a complete file, for the formats whose end is marked: a file cut short (an interrupted
# copy or download) passes the header read, and would fail only when its pixels are decoded in training.
_END_MARKERS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}
_TAIL_BYTES = 1024


def probe_image(path: str) -> tuple[int, int]:
    """(width, height) of an image after cheap checks, without decoding it: the header (PIL's `Image.open`
    reads only that) and the end marker of PNG / JPEG files. Raises ValueError saying what is wrong (the
    caller adds where). A record's `image_wh` is not compared: XTuner-format data often gives another size
    than the file's (the shared reference data does), and tokens and tiles both follow `image_wh`."""
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"image {path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            fmt, actual = im.format, im.size
    except Image.DecompressionBombError as e:  # over twice PIL's limit: refused by the header read itself
        raise ValueError(_too_large(path, _png_size(path), str(e))) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises SyntaxError for some bad headers
        raise ValueError(f"image {path} is not a readable image ({e})") from None
    if Image.MAX_IMAGE_PIXELS and actual[0] * actual[1] > Image.MAX_IMAGE_PIXELS:
        raise ValueError(_too_large(path, actual, ""))
    marker = _END_MARKERS.get(fmt)
    if marker is not None:
        with open(path, "rb") as f:
            f.seek(max(0, size - _TAIL_BYTES))
            if marker not in f.read():
                raise ValueError(f"image {path} is truncated ({fmt} without its end marker, {size} bytes)")
    return actual


def _too_large(path: str, wh: tuple[int, int] | None, why: str) -> str:
    size = f"{wh[0]} x {wh[1]} pixels" if wh else why
    return (f"image {path} is {size}, over PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels (its guard against "
            "decompression bombs); it was not decoded: resize it, e.g. to the model's tile size times max_tiles")


def _png_size(path: str) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (PIL refuses to open one over its limit); None for other formats."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _to_tensor(im: Image.Image) -> torch.Tensor:
    # [H, W, 3] uint8 -> [3, H, W] float in [0, 1]
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return t.permute(2, 0, 1).float().div_(255.0)


def load_tiles(path: str, image_size: int, max_tiles: int, use_thumbnail: bool,
               grid_wh: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an image into normalised tiles: float32 [num_tiles, 3, image_size, image_size].

    `grid_wh`: the (width, height) the token count was computed from (the record's `image_wh`);
    the grid follows it so pixels always match the tokens even if the record's size is off.
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
        cols, rows = tile_grid(*(grid_wh or im.size), image_size, max_tiles)
        big = im.resize((cols * image_size, rows * image_size), Image.BICUBIC)
        tiles = [
            big.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
            for r in range(rows)
            for c in range(cols)
        ]
        if use_thumbnail and len(tiles) > 1:
            tiles.append(im.resize((image_size, image_size), Image.BICUBIC))
    x = torch.stack([_to_tensor(t) for t in tiles])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std

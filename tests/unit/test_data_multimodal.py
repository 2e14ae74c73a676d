"""InternVL tiling: grid choice (vs transformers' implementation), token counts, pixel tiles."""

import numpy as np
import pytest
import torch
from PIL import Image

from xtune.data.multimodal import IMAGENET_MEAN, IMAGENET_STD, image_size_of, load_tiles, num_tiles, tile_grid


@pytest.mark.parametrize("max_tiles", [1, 4, 6, 12])
def test_grid_matches_transformers(max_tiles):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(0)
    sizes = [(375, 500), (640, 480), (448, 448), (1000, 10), (10, 1000), (896, 448), (1344, 448)]
    sizes += [tuple(int(v) for v in rng.integers(16, 3000, 2)) for _ in range(200)]
    for w, h in sizes:
        ref = get_optimal_tiled_canvas((h, w), (448, 448), 1, max_tiles)  # (cols, rows)
        assert tile_grid(w, h, 448, max_tiles) == tuple(ref), (w, h)


def test_num_tiles_thumbnail_only_with_several_tiles():
    assert num_tiles(448, 448, 448, 12, True) == 1
    assert num_tiles(896, 448, 448, 12, True) == 3
    assert num_tiles(896, 448, 448, 12, False) == 2
    assert num_tiles(896, 448, 448, 1, True) == 1


def test_load_tiles_single_tile_is_resized_and_normalised(make_image):
    path = make_image("a.png", 50, 40)
    x = load_tiles(str(path), 32, 1, True)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    ref = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    ref = (ref - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    assert torch.allclose(x[0], torch.from_numpy(ref).permute(2, 0, 1), atol=1e-5)


def test_load_tiles_grid_and_thumbnail(make_image):
    path = make_image("wide.png", 300, 100)
    x = load_tiles(str(path), 32, 6, True)
    assert x.shape == (num_tiles(300, 100, 32, 6, True), 3, 32, 32) == (4, 3, 32, 32)
    big = np.asarray(Image.open(path).convert("RGB").resize((96, 32), Image.BICUBIC), dtype=np.float32) / 255
    mid = (big[:, 32:64] - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    assert torch.allclose(x[1], torch.from_numpy(mid).permute(2, 0, 1), atol=1e-5)  # tiles left to right
    # the grid may be forced to the size the token count came from
    assert load_tiles(str(path), 32, 6, True, grid_wh=(32, 32)).shape[0] == 1


def test_image_size_from_header(make_image, resource_dir):
    assert image_size_of(str(make_image("a.png", 33, 17))) == (33, 17)
    assert image_size_of(str(resource_dir / "mscoco_dog_000000319154.jpg")) == (375, 500)

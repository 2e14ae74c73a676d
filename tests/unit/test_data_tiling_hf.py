"""xtune's InternVL tiling against transformers' own image processor (GotOcr2ImageProcessorPil: the
InternVL/Intern-S1 tiling, no torchvision needed): the same tile count and the same pixels on the
bundled images. xtune keeps its own `load_tiles` because the grid can follow the record's `image_wh`
(the size the token count was computed from), which transformers' processor does not offer."""

import glob

import pytest
import torch
from PIL import Image

from tests.conftest import RESOURCE, ROOT
from xtune.data.multimodal import IMAGENET_MEAN, IMAGENET_STD, load_tiles, num_tiles

DEMO = sorted(glob.glob(str(ROOT / "src" / "xtune" / "assets" / "demo" / "images" / "*.png")))
PHOTOS = sorted(glob.glob(str(RESOURCE / "*.jpg")))  # the shared photos (skipped without ../shared)


def processor(image_size, max_tiles):
    from transformers import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=max_tiles, size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=Image.BICUBIC, do_convert_rgb=True)


@pytest.mark.parametrize("image_size,max_tiles,paths", [
    (28, 4, DEMO), (56, 6, DEMO), (448, 12, PHOTOS)], ids=["demo-28px-4", "demo-56px-6", "photos-448px-12"])
def test_tiles_equal_transformers_image_processor(image_size, max_tiles, paths):
    if not paths:
        pytest.skip("shared resource photos not present")
    proc = processor(image_size, max_tiles)
    counts = set()
    for path in paths:
        ours = load_tiles(path, image_size, max_tiles, use_thumbnail=True)
        with Image.open(path) as im:
            theirs = proc(images=[im], return_tensors="pt")["pixel_values"]
            w, h = im.size
        assert ours.shape == theirs.shape, path
        assert num_tiles(w, h, image_size, max_tiles, True) == ours.shape[0]
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=path)
        counts.add(ours.shape[0])
    assert len(counts) > 1 or len(paths) < 3  # several grids are exercised, not only one

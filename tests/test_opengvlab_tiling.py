"""vlmd's tiles for OpenGVLab's checkpoints (config.json `"model_type": "internvl_chat"`).

Two references, both compared with `np.array_equal`: (a) transformers' `GotOcr2ImageProcessorPil`
with the corresponding settings, and (b) `opengvlab_tiles` below, OpenGVLab's procedure
(`dynamic_preprocess` + `build_transform`) restated from its algorithm: grids collected in a
Python set and sorted by tile count, PIL's default (bicubic) resize to the grid, row-major crops,
a thumbnail when there is more than one tile, then torchvision's Resize (a no-op at the tile's
size), ToTensor (uint8 -> float32, / 255 in float32) and Normalize ((x - mean) / std in float32).
They differ only in the order of grids of one tile count, which an exact ratio tie between two
such grids exposes; vlmd follows (b) for OpenGVLab's layout and (a) for transformers'.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GotOcr2ImageProcessorPil

from tests.test_image import make_image
from vlmd.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilingConfig,
    _normalize_lut,
    num_tiles,
    preprocess,
    tile_grid,
)

# ---------------------------------------------------------------------------------------------------
# Reference (b): OpenGVLab's procedure


def opengvlab_grid(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
    ratios = {
        (cols, rows)
        for n in range(min_num, max_num + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_num <= cols * rows <= max_num
    }
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in sorted(ratios, key=lambda grid: grid[0] * grid[1]):
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def opengvlab_crops(image: Image.Image, tile: int, min_num: int, max_num: int, thumbnail: bool):
    cols, rows = opengvlab_grid(image.width, image.height, tile, min_num, max_num)
    resized = image.resize((cols * tile, rows * tile))  # PIL's default filter: bicubic for RGB
    crops = [
        resized.crop((i % cols * tile, i // cols * tile, (i % cols + 1) * tile, (i // cols + 1) * tile))
        for i in range(cols * rows)
    ]
    if thumbnail and len(crops) != 1:
        crops.append(image.resize((tile, tile)))
    return crops


def to_normalized_tensor(image: Image.Image, tile: int) -> torch.Tensor:
    """torchvision's Resize((tile, tile), BICUBIC) on a PIL image, ToTensor and Normalize."""
    image = image.resize((tile, tile), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))  # [H, W, C]
    tensor = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [C, H, W]
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]  # [C, 1, 1]
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return tensor.sub_(mean).div_(std)


def opengvlab_tiles(image: Image.Image, cfg: TilingConfig) -> np.ndarray:
    if cfg.crop_to_patches:
        crops = opengvlab_crops(image, cfg.tile_size, cfg.min_tiles, cfg.max_tiles, cfg.use_thumbnail)
    else:
        crops = [image]  # dynamic_image_size false: the whole image is one tile
    return torch.stack([to_normalized_tensor(crop, cfg.tile_size) for crop in crops]).numpy()


# ---------------------------------------------------------------------------------------------------
# Reference (a): transformers


def transformers_tiles(image: Image.Image, cfg: TilingConfig, **processor_settings) -> np.ndarray:
    """GotOcr2 with `cfg`'s settings (`processor_settings` override them)."""
    settings = {
        "crop_to_patches": cfg.crop_to_patches,
        "size": {"height": cfg.tile_size, "width": cfg.tile_size},
        "min_patches": cfg.min_tiles,
        "max_patches": cfg.max_tiles,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    processor = GotOcr2ImageProcessorPil(**{**settings, **processor_settings})
    tiles = np.stack(processor(image)["pixel_values"])
    if not cfg.use_thumbnail and len(tiles) > 1:
        tiles = tiles[:-1]  # GotOcr2 always appends the thumbnail
    return tiles


def opengvlab_config(**settings) -> TilingConfig:
    return TilingConfig(procedure="opengvlab", **settings)


# (width, height): tiny, 1 x 30-like extremes, square, wide, tall, ratio ties
SIZES = [
    (1, 1),
    (3, 2),
    (1, 30),
    (30, 1),
    (2, 700),
    (20, 20),
    (448, 448),
    (500, 400),  # 1.25: (1,2) and (2,1) tie at 2..2; too small to move on, keeps (1,2)
    (1000, 800),  # the same tie, large enough to move on to (2,1)
    (1000, 500),  # (2,1) vs (4,2) tie
    (2000, 1000),
    (900, 600),
    (300, 700),
    (513, 1027),
    (1500, 200),
]
CONFIGS = {
    "internvl2.5 (1..12, thumbnail)": opengvlab_config(max_tiles=12),
    "tile limit 6": opengvlab_config(max_tiles=6),
    "tile limit 2": opengvlab_config(max_tiles=2),
    "tile limit 1": opengvlab_config(max_tiles=1),
    "2..2": opengvlab_config(min_tiles=2, max_tiles=2),
    "no thumbnail": opengvlab_config(max_tiles=12, use_thumbnail=False),
    "dynamic_image_size off": opengvlab_config(crop_to_patches=False),
    "224 px tiles, 1..6": opengvlab_config(tile_size=224, max_tiles=6),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_tiles_equal_opengvlab_and_transformers(config, width, height):
    cfg = CONFIGS[config]
    image = make_image(width, height, seed=width * 7 + height)
    ours = preprocess(image, cfg)
    opengvlab = opengvlab_tiles(image, cfg)
    assert ours.dtype == opengvlab.dtype == np.float32
    assert ours.shape == opengvlab.shape == (num_tiles(width, height, cfg), 3, cfg.tile_size, cfg.tile_size)
    assert np.array_equal(ours, opengvlab)
    assert np.array_equal(ours, transformers_tiles(image, cfg))


def test_the_tie_at_2_tiles_goes_the_same_way_in_both():
    cfg = CONFIGS["2..2"]
    assert tile_grid(500, 400, cfg) == opengvlab_grid(500, 400, 448, 2, 2) == (1, 2)
    assert tile_grid(1000, 800, cfg) == opengvlab_grid(1000, 800, 448, 2, 2) == (2, 1)


# Exact ratio ties between two grids of one tile count: only with min_tiles >= 4.
DIFFERING = [(4, 4, 500, 200), (5, 5, 520, 200), (5, 5, 1300, 500), (6, 7, 1500, 400), (8, 8, 150, 480)]


@pytest.mark.parametrize(("min_tiles", "max_tiles", "width", "height"), DIFFERING)
def test_where_the_references_differ_each_layout_follows_its_own(min_tiles, max_tiles, width, height):
    image = make_image(width, height, seed=width + height)
    opengvlab_cfg = opengvlab_config(min_tiles=min_tiles, max_tiles=max_tiles, tile_size=224)
    transformers_cfg = replace(opengvlab_cfg, procedure="transformers")
    opengvlab = opengvlab_tiles(image, opengvlab_cfg)
    transformers = transformers_tiles(image, transformers_cfg)
    assert opengvlab.shape != transformers.shape or not np.array_equal(opengvlab, transformers)
    assert tile_grid(width, height, opengvlab_cfg) == opengvlab_grid(width, height, 224, min_tiles, max_tiles)
    assert np.array_equal(preprocess(image, opengvlab_cfg), opengvlab)
    assert np.array_equal(preprocess(image, transformers_cfg), transformers)


@pytest.mark.parametrize(
    ("min_tiles", "max_tiles"), [(1, 12), (1, 6), (2, 8), (4, 4), (5, 5), (8, 9), (3, 40)]
)
def test_grid_choice_equals_opengvlab_over_a_sweep(min_tiles, max_tiles):
    cfg = opengvlab_config(min_tiles=min_tiles, max_tiles=max_tiles)
    sides = [1, 2, 3, 5, 7, 100, 200, 224, 300, 447, 448, 449, 500, 600, 672, 896, 1000, 1300, 2000, 4000]
    for width in sides:
        for height in sides:
            expected = opengvlab_grid(width, height, 448, min_tiles, max_tiles)
            assert tile_grid(width, height, cfg) == expected, (width, height)


def test_float32_division_by_255_equals_transformers_float64_rescale():
    """Why one normalisation table serves both: ToTensor's float32 `v / 255` and transformers'
    `float32(float64(v) * (1 / 255))` agree for every uint8 value."""
    values = np.arange(256, dtype=np.uint8)
    torchvision = torch.from_numpy(values).to(torch.float32).div(255).numpy()
    transformers = (values.astype(np.float64) * (1 / 255)).astype(np.float32)
    assert np.array_equal(torchvision, transformers)


def test_many_tile_limits_share_one_normalisation_table():
    image = make_image(300, 200)
    cfg = opengvlab_config(max_tiles=40)
    _normalize_lut.cache_clear()
    for limit in range(1, 41):
        preprocess(image, cfg.with_max_tiles(limit))
    assert _normalize_lut.cache_info().currsize == 1


def test_limit_below_min_tiles_is_one_tile_as_in_both_references():
    image = make_image(900, 300)
    limited = opengvlab_config(min_tiles=4, max_tiles=12).with_max_tiles(3)
    assert limited.max_tiles_per_image == 1 and num_tiles(900, 300, limited) == 1
    # No grid has 4..3 tiles: both procedures fall back to the (1, 1) grid.
    crops = opengvlab_crops(image, 448, min_num=4, max_num=3, thumbnail=True)
    opengvlab = torch.stack([to_normalized_tensor(crop, 448) for crop in crops]).numpy()
    assert np.array_equal(preprocess(image, limited), opengvlab)
    assert np.array_equal(
        preprocess(image, limited), transformers_tiles(image, limited, min_patches=4, max_patches=3)
    )


# ---------------------------------------------------------------------------------------------------
# TilingConfig.from_model_dir


def write_opengvlab_dir(path, **top_level) -> None:
    config = {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "vision_config": {"image_size": 448, "patch_size": 14},
        **top_level,
    }
    (path / "config.json").write_text(json.dumps(config))
    # OpenGVLab ships a CLIP-style preprocessor_config.json that their code does not tile with.
    clip = {"crop_size": 224, "image_mean": [0.481, 0.458, 0.408], "size": 224, "max_patches": 99}
    (path / "preprocessor_config.json").write_text(json.dumps(clip))


def test_from_model_dir_reads_opengvlab_config_json(tmp_path):
    write_opengvlab_dir(
        tmp_path,
        force_image_size=448,
        dynamic_image_size=True,
        use_thumbnail=True,
        min_dynamic_patch=1,
        max_dynamic_patch=12,
    )
    assert TilingConfig.from_model_dir(tmp_path) == opengvlab_config(max_tiles=12)


def test_from_model_dir_opengvlab_defaults_and_image_size(tmp_path):
    # InternVLChatConfig's defaults: no dynamic tiling, no thumbnail, 1..6 tiles.
    write_opengvlab_dir(tmp_path)
    cfg = TilingConfig.from_model_dir(tmp_path)
    assert cfg == opengvlab_config(crop_to_patches=False, use_thumbnail=False, max_tiles=6)
    assert num_tiles(2000, 500, cfg) == 1
    write_opengvlab_dir(tmp_path, vision_config={"image_size": [224, 224]}, dynamic_image_size=True)
    assert TilingConfig.from_model_dir(tmp_path).tile_size == 224
    write_opengvlab_dir(tmp_path, force_image_size=336, dynamic_image_size=True, use_thumbnail=False)
    cfg = TilingConfig.from_model_dir(tmp_path)
    assert (cfg.tile_size, cfg.crop_to_patches, cfg.use_thumbnail) == (336, True, False)
    assert (cfg.image_mean, cfg.image_std, cfg.rescale_factor) == (IMAGENET_MEAN, IMAGENET_STD, 1 / 255)


def test_from_model_dir_opengvlab_flags_win(tmp_path):
    write_opengvlab_dir(tmp_path, dynamic_image_size=True, min_dynamic_patch=2, max_dynamic_patch=12)
    cfg = TilingConfig.from_model_dir(tmp_path, min_tiles=None, max_tiles=4)
    assert (cfg.min_tiles, cfg.max_tiles, cfg.procedure) == (2, 4, "opengvlab")
    assert TilingConfig.from_model_dir(tmp_path, min_tiles=1).min_tiles == 1


def test_transformers_checkpoints_are_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl", "max_dynamic_patch": 2}))
    assert TilingConfig.from_model_dir(tmp_path) == TilingConfig()


def test_transparency_follows_each_procedure():
    """An RGBA upload: OpenGVLab's load_image converts with PIL (the alpha channel is dropped),
    transformers composites it onto white; each layout's tiles follow its own."""
    import io

    from vlmd.image import decode_image

    rgba = np.asarray(make_image(600, 300, seed=5).convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, 600, dtype=np.uint8)[None, :]  # transparent to opaque
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    data = buffer.getvalue()
    opengvlab_cfg = opengvlab_config(max_tiles=6)
    transformers_cfg = replace(opengvlab_cfg, procedure="transformers")
    ours = preprocess(decode_image(data, procedure="opengvlab"), opengvlab_cfg)
    assert np.array_equal(ours, opengvlab_tiles(Image.open(io.BytesIO(data)).convert("RGB"), opengvlab_cfg))
    theirs = preprocess(decode_image(data), transformers_cfg)
    assert np.array_equal(theirs, transformers_tiles(Image.open(io.BytesIO(data)), transformers_cfg))
    assert not np.array_equal(ours, theirs)

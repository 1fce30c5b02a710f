"""Tests for vlmd.image: decoding untrusted bytes and InternVL tiling.

The reference is transformers' `GotOcr2ImageProcessorPil` with `crop_to_patches=True`, which is how
`InternVLProcessor` calls it (InternVLProcessor itself is not used: it imports torchvision). Pixel
values must be bit-identical, not merely close.
"""

import io
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from transformers import GotOcr2ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from vlmd.image import (
    ImageError,
    TilingConfig,
    decode_image,
    num_tiles,
    preprocess,
    tile_grid,
)

DEFAULT = TilingConfig()
REPO_ROOT = Path(__file__).resolve().parents[1]


@cache
def reference_processor(cfg: TilingConfig) -> GotOcr2ImageProcessorPil:
    assert cfg.use_thumbnail, "transformers always appends the thumbnail"
    return GotOcr2ImageProcessorPil(
        crop_to_patches=cfg.crop_to_patches,
        size={"height": cfg.tile_size, "width": cfg.tile_size},
        min_patches=cfg.min_tiles,
        max_patches=cfg.max_tiles,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        rescale_factor=cfg.rescale_factor,
        resample=cfg.resample,
    )


def assert_matches_transformers(ours_input: Image.Image, cfg: TilingConfig, ref_input=None) -> None:
    """preprocess(ours_input) must equal transformers on ref_input (default: the same image)."""
    ref_input = ours_input if ref_input is None else ref_input
    reference = reference_processor(cfg)(ref_input)
    ours = preprocess(ours_input, cfg)
    assert ours.dtype == np.float32
    assert reference["num_patches"] == [num_tiles(ours_input.width, ours_input.height, cfg)]
    assert ours.shape == (reference["num_patches"][0], 3, cfg.tile_size, cfg.tile_size)
    assert np.array_equal(ours, np.stack(reference["pixel_values"]))


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A gradient plus noise: edges and fine detail both stress the resize filter."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = (xs * 255 // max(width - 1, 1) + ys * 255 // max(height - 1, 1)) // 2  # [H, W]
    bands = len(Image.new(mode, (1, 1)).getbands())
    noise = rng.integers(-40, 41, (height, width, bands))  # [H, W, bands]
    pixels = np.clip(gradient[..., None] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if bands == 1 else pixels).convert(mode)


def encode(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# Tiling against transformers


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (448, 448),
        (20, 20),
        (100, 800),
        (800, 100),
        (1000, 300),
        (513, 1027),
        (2000, 1500),
        (1, 1000),
        (1000, 1),
        (1000, 500),  # ratio tie (2,1) vs (4,2): image too small, keeps (2,1)
        (2000, 1000),  # same tie, large enough to move to (4,2)
    ],
)
def test_preprocess_matches_transformers(width, height):
    assert_matches_transformers(make_image(width, height, seed=width + height), DEFAULT)


@pytest.mark.parametrize(
    ("cfg", "width", "height"),
    [
        (TilingConfig(min_tiles=2, max_tiles=6), 513, 1027),
        (TilingConfig(min_tiles=2, max_tiles=6), 448, 448),
        (TilingConfig(max_tiles=1), 1000, 300),
        (TilingConfig(crop_to_patches=False), 1000, 300),
        (TilingConfig(max_tiles=4), 600, 400),  # tie (1,1) vs (2,1): moves to (2,1)
        (TilingConfig(max_tiles=4), 300, 200),  # same tie: stays (1,1)
        (TilingConfig(resample=Image.Resampling.BILINEAR), 700, 300),
        (TilingConfig(tile_size=224, max_tiles=6, image_mean=(0.5,) * 3, image_std=(0.5,) * 3), 500, 260),
    ],
)
def test_preprocess_matches_transformers_for_other_configs(cfg, width, height):
    assert_matches_transformers(make_image(width, height, seed=width), cfg)


def test_tie_break_rule():
    # Exact ratio ties go to the larger grid while the image covers > half of its area.
    assert tile_grid(1000, 500, DEFAULT) == (2, 1)
    assert tile_grid(2000, 1000, DEFAULT) == (4, 2)
    assert tile_grid(600, 400, TilingConfig(max_tiles=4)) == (2, 1)
    assert tile_grid(300, 200, TilingConfig(max_tiles=4)) == (1, 1)


@pytest.mark.parametrize(("min_tiles", "max_tiles"), [(1, 12), (1, 6), (2, 8), (4, 4), (1, 2), (3, 40)])
def test_tile_grid_and_num_tiles_match_transformers(min_tiles, max_tiles):
    cfg = TilingConfig(min_tiles=min_tiles, max_tiles=max_tiles)
    processor = reference_processor(cfg)
    sides = [1, 2, 3, 7, 100, 224, 300, 447, 448, 449, 500, 600, 672, 896, 1000, 1344, 1500, 2000, 4000]
    for width in sides:
        for height in sides:
            expected = get_optimal_tiled_canvas((height, width), (448, 448), min_tiles, max_tiles)
            assert tile_grid(width, height, cfg) == expected, (width, height)
            expected_tiles = processor.get_number_of_image_patches(height, width, {})
            assert num_tiles(width, height, cfg) == expected_tiles, (width, height)


def test_no_tiling_gives_one_tile():
    for cfg in (TilingConfig(max_tiles=1), TilingConfig(crop_to_patches=False)):
        assert tile_grid(2000, 500, cfg) == (1, 1)
        assert num_tiles(2000, 500, cfg) == 1


def test_without_thumbnail_only_grid_tiles():
    image = make_image(1000, 300)
    ours = preprocess(image, TilingConfig(use_thumbnail=False))
    with_thumbnail = preprocess(image, DEFAULT)
    assert num_tiles(1000, 300, TilingConfig(use_thumbnail=False)) == 3
    assert ours.shape == (3, 3, 448, 448)
    assert np.array_equal(ours, with_thumbnail[:3])


def test_tiles_are_row_major():
    # Solid colour per grid cell: tile i must hold cell (row i // cols, col i % cols).
    cols, rows, tile = 3, 2, 448
    cells = np.arange(cols * rows, dtype=np.uint8).reshape(rows, cols) * 40  # [rows, cols]
    pixels = np.repeat(np.repeat(cells, tile, axis=0), tile, axis=1)  # [rows * tile, cols * tile]
    image = Image.fromarray(np.stack([pixels] * 3, axis=-1))
    assert tile_grid(image.width, image.height, DEFAULT) == (cols, rows)
    tiles = preprocess(image, DEFAULT)
    for index in range(cols * rows):
        expected = (cells.flat[index] / 255 - DEFAULT.image_mean[0]) / DEFAULT.image_std[0]
        assert np.allclose(tiles[index, 0], expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Colour modes and decoding


def _rgba_with_transparency() -> Image.Image:
    image = make_image(240, 160, "RGBA")
    alpha = np.tile(np.linspace(0, 255, 240).astype(np.uint8), (160, 1))  # [H, W]
    alpha[:40] = 0  # fully transparent band must come out white
    image.putalpha(Image.fromarray(alpha))
    return image


def _palette_with_transparency_key() -> tuple[Image.Image, dict]:
    image = make_image(240, 160).quantize(colors=16)
    return image, {"transparency": 3}


def _rgb_with_transparency_key() -> tuple[Image.Image, dict]:
    image = make_image(240, 160).quantize(colors=8).convert("RGB")
    return image, {"transparency": image.getpixel((0, 0))}


@pytest.mark.parametrize(
    "case",
    ["L", "LA", "RGBA", "P+transparency", "RGB+transparency", "CMYK-JPEG", "RGB-JPEG", "RGB-WEBP"],
)
def test_decode_and_preprocess_match_transformers_for_modes(case):
    save_kwargs: dict = {}
    fmt = "PNG"
    if case == "RGBA":
        image = _rgba_with_transparency()
    elif case == "P+transparency":
        image, save_kwargs = _palette_with_transparency_key()
    elif case == "RGB+transparency":
        image, save_kwargs = _rgb_with_transparency_key()
    elif case.endswith("JPEG") or case.endswith("WEBP"):
        mode, fmt = case.split("-")
        image = make_image(240, 160, mode)
    else:
        image = make_image(240, 160, case)
    data = encode(image, fmt, **save_kwargs)
    raw = Image.open(io.BytesIO(data))
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert decoded.size == (240, 160)
    assert_matches_transformers(decoded, DEFAULT, ref_input=raw)
    assert_matches_transformers(Image.open(io.BytesIO(data)), DEFAULT)  # preprocess converts too


def test_transparency_composited_onto_white():
    decoded = decode_image(encode(_rgba_with_transparency(), "PNG"))
    assert np.all(np.asarray(decoded)[:40] == 255)
    palette, save_kwargs = _palette_with_transparency_key()
    decoded = np.asarray(decode_image(encode(palette, "PNG", **save_kwargs)))
    transparent = np.asarray(palette) == 3
    assert transparent.any() and np.all(decoded[transparent] == 255)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(make_image(300, 200), "JPEG", exif=exif)
    decoded = decode_image(data)
    assert decoded.size == (200, 300)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.asarray(decoded), np.asarray(upright.convert("RGB")))
    assert_matches_transformers(decoded, DEFAULT, ref_input=upright)


def test_exif_rotations_differ():
    decoded = []
    for orientation in (6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        decoded.append(np.asarray(decode_image(encode(make_image(300, 200), "PNG", exif=exif))))
    assert np.array_equal(decoded[0], decoded[1][::-1, ::-1])  # 90 degrees each way


def test_multi_picture_jpeg_decodes_first_frame():
    # Phone cameras write MPO; PIL opens it through the JPEG plugin.
    frames = [Image.new("RGB", (60, 50), (value, value, value)) for value in (0, 200)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image(data)
    assert decoded.size == (60, 50) and np.asarray(decoded).max() < 10


# ---------------------------------------------------------------------------------------------------
# Decode errors


def test_load_truncated_images_stays_false():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_refuses_to_decode_if_truncated_loading_was_enabled(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(make_image(20, 20), "PNG"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"This is a plain text file, not a picture.\n" * 20,
        encode(make_image(20, 20), "PCX"),  # a real image, but not an upload format we accept
    ],
    ids=["empty", "random", "text", "unsupported-format"],
)
def test_not_an_image(data):
    with pytest.raises(ImageError, match="^not a decodable image: "):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt):
    data = encode(make_image(300, 200), fmt)
    with pytest.raises(ImageError, match="^truncated image"):
        decode_image(data[: len(data) // 2])


def test_over_max_pixels():
    data = encode(make_image(300, 200), "PNG")
    assert decode_image(data, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageError) as excinfo:
        decode_image(data, max_pixels=59_999)
    assert str(excinfo.value) == "image too large: 300 x 200 pixels exceeds the limit of 59999"


def test_decompression_bomb(monkeypatch):
    # PIL refuses images over 2 * MAX_IMAGE_PIXELS from the header alone, before decoding.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="^image too large: "):
        decode_image(encode(make_image(100, 100), "PNG"))


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------------------------------------------
# TilingConfig


def _saved_processor_dict(tmp_path: Path) -> dict:
    processor = GotOcr2ImageProcessorPil(
        size={"height": 384, "width": 384},
        min_patches=2,
        max_patches=6,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.3, 0.4],
        resample=Image.Resampling.BILINEAR,
    )
    processor.save_pretrained(tmp_path)
    return json.loads((tmp_path / "preprocessor_config.json").read_text())


EXPECTED_FROM_FILE = TilingConfig(
    tile_size=384, min_tiles=2, max_tiles=6, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.4), resample=2
)


def test_from_model_dir_without_files_gives_internvl_defaults(tmp_path):
    cfg = TilingConfig.from_model_dir(tmp_path)
    assert cfg == TilingConfig()
    assert (cfg.tile_size, cfg.min_tiles, cfg.max_tiles) == (448, 1, 12)
    assert cfg.image_mean == (0.485, 0.456, 0.406) and cfg.image_std == (0.229, 0.224, 0.225)


def test_from_model_dir_reads_preprocessor_config(tmp_path):
    saved = _saved_processor_dict(tmp_path)
    # save_pretrained writes crop_to_patches=false; InternVLProcessor overrides it on every call.
    assert saved["crop_to_patches"] is False
    assert TilingConfig.from_model_dir(tmp_path) == EXPECTED_FROM_FILE


def test_from_model_dir_reads_nested_processor_config(tmp_path):
    nested = {"image_processor": _saved_processor_dict(tmp_path), "processor_class": "InternVLProcessor"}
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert TilingConfig.from_model_dir(str(tmp_path)) == EXPECTED_FROM_FILE


def test_nested_processor_config_wins_over_preprocessor_config(tmp_path):
    # transformers' own priority when a directory holds both.
    nested = _saved_processor_dict(tmp_path)
    nested["max_patches"] = 9
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": nested}))
    assert TilingConfig.from_model_dir(tmp_path).max_tiles == 9


def test_processor_config_without_image_processor_falls_back(tmp_path):
    _saved_processor_dict(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": 256}))
    assert TilingConfig.from_model_dir(tmp_path) == EXPECTED_FROM_FILE


def test_from_model_dir_overrides_win(tmp_path):
    _saved_processor_dict(tmp_path)
    cfg = TilingConfig.from_model_dir(tmp_path, max_tiles=4, tile_size=None, crop_to_patches=False)
    assert cfg.max_tiles == 4 and cfg.tile_size == 384 and cfg.crop_to_patches is False
    assert TilingConfig.from_model_dir(tmp_path, use_thumbnail=False).use_thumbnail is False


def test_from_model_dir_matches_transformers_loading_the_same_dir(tmp_path):
    _saved_processor_dict(tmp_path)
    loaded = GotOcr2ImageProcessorPil.from_pretrained(tmp_path)
    image = make_image(900, 500)
    reference = loaded(image, crop_to_patches=True)  # as InternVLProcessor calls it
    ours = preprocess(image, TilingConfig.from_model_dir(tmp_path))
    assert np.array_equal(ours, np.stack(reference["pixel_values"]))


def test_config_validation(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 448, "width": 224}}))
    with pytest.raises(ValueError, match="square"):
        TilingConfig.from_model_dir(tmp_path)
    with pytest.raises(ValueError, match="min_tiles"):
        TilingConfig(min_tiles=5, max_tiles=4)
    with pytest.raises(ValueError, match="image_mean"):
        TilingConfig(image_mean=(0.5, 0.5))
    assert TilingConfig(image_mean=[0.5, 0.5, 0.5]).image_mean == (0.5, 0.5, 0.5)
    assert hash(TilingConfig(image_mean=[0.5, 0.5, 0.5])) == hash(TilingConfig(image_mean=(0.5,) * 3))


def test_image_module_imports_neither_torch_nor_transformers():
    code = (
        "import sys, vlmd.image; "
        "bad = {'torch', 'transformers', 'torchvision'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


@pytest.mark.parametrize(
    "width, height, max_pixels", [(800, 600, 300_000), (4032, 3024, 12_000_000), (6000, 1000, 2_000_000)]
)
def test_fit_within_keeps_the_aspect_ratio_under_the_limit(width, height, max_pixels):
    from vlmd.image import fit_within

    new_width, new_height = fit_within(width, height, max_pixels)
    assert new_width * new_height <= max_pixels < (new_width + 1) * (new_height + 1)
    assert abs(new_width / new_height - width / height) < 0.01 * width / height
    assert fit_within(width, height, width * height) == (width, height)
    assert fit_within(10_000, 3, 1000) == (1000, 1)  # a degenerate case still fits

"""InternVL image preprocessing: untrusted bytes -> RGB image -> normalised tiles.

The output is bit-identical to transformers' `GotOcr2ImageProcessorPil` called with
`crop_to_patches=True`, as `InternVLProcessor` calls it: the same grid choice, the same PIL resizes,
the same float64 rescale and float32 normalisation. Any drift would change what the vision tower
sees, so `tests/test_image.py` compares against transformers with `np.array_equal`. For OpenGVLab's
own checkpoints (config.json `"model_type": "internvl_chat"`) it is bit-identical to their
`dynamic_preprocess` + `build_transform` instead (`tests/test_opengvlab_tiling.py`); the two
procedures differ only in how they order grids of one tile count (see `_candidate_grids`).

Only PIL and numpy are imported: this runs in the HTTP front end and in load workers, which must not
pay for (or depend on) torch.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Whose procedure the tiles follow where transformers' and OpenGVLab's differ (`TilingConfig`).
PROCEDURES = ("transformers", "opengvlab")

# Formats a client may upload. Anything else (EPS shells out to Ghostscript, PDF, PSD, FITS, ...) is
# rejected before a decoder runs, which keeps PIL's rarely exercised plugins off untrusted input.
# The multi-picture JPEGs (MPO) many phone cameras write open through the JPEG plugin.
Image.init()
_UPLOAD_FORMATS = tuple(
    fmt
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "ICO", "TGA", "PPM", "JPEG2000")
    if fmt in Image.OPEN
)


class ImageError(ValueError):
    """An uploaded image that cannot be used; the message is fit for an HTTP 400 response body."""


class ImageTooLarge(ImageError):
    """The image has more pixels than the caller allows (found from its header, before decoding)."""

    def __init__(self, width: int, height: int, max_pixels: int) -> None:
        super().__init__(f"image too large: {width} x {height} pixels exceeds the limit of {max_pixels}")
        self.width, self.height, self.max_pixels = width, height, max_pixels


@dataclass(frozen=True)
class TilingConfig:
    """How an image becomes tiles: InternVL's dynamic-resolution "crop to patches" scheme.

    The image is resized to a `cols x rows` grid of `tile_size` squares whose aspect ratio is the
    closest to the image's among grids of `min_tiles..max_tiles` tiles, cut into tiles in row-major
    order, and followed by a thumbnail of the whole image when there is more than one tile. With
    `crop_to_patches=False` or `max_tiles == 1` the whole image becomes a single tile.
    `procedure` names whose steps are followed where transformers' (GotOcr2, "transformers") and
    OpenGVLab's (`load_image` + `dynamic_preprocess`, "opengvlab") differ: the order of grids of
    one tile count, which decides exact ratio ties (`_candidate_grids`), and transparency, which
    transformers composites onto white and OpenGVLab drops (PIL's `convert("RGB")`).
    """

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    crop_to_patches: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC.value
    procedure: str = "transformers"

    def __post_init__(self) -> None:
        # Config files hold lists; tuples keep the frozen config hashable and comparable.
        object.__setattr__(self, "image_mean", _per_channel(self.image_mean, "image_mean"))
        object.__setattr__(self, "image_std", _per_channel(self.image_std, "image_std"))
        object.__setattr__(self, "resample", int(self.resample))
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}..{self.max_tiles}")
        if 0.0 in self.image_std:
            raise ValueError(f"image_std must be non-zero, got {self.image_std}")
        if self.procedure not in PROCEDURES:
            raise ValueError(f"procedure must be one of {PROCEDURES}, got {self.procedure!r}")
        Image.Resampling(self.resample)  # raises ValueError for an unknown filter

    @property
    def max_tiles_per_image(self) -> int:
        """The most tiles one image can become: the largest grid plus its thumbnail."""
        if not self.crop_to_patches or self.max_tiles <= 1:
            return 1
        return self.max_tiles + (1 if self.use_thumbnail else 0)

    def with_max_tiles(self, max_tiles: int) -> TilingConfig:
        """This config under a request's tile limit (`max_dynamic_patch`; 0: none, the config itself).

        A limit below `min_tiles` leaves no grid to choose from; both reference procedures then fall
        back to the (1, 1) grid, the whole image as one tile, which is what `max_tiles=1` gives.
        """
        if max_tiles == 0:
            return self
        if max_tiles < self.min_tiles:
            return replace(self, min_tiles=1, max_tiles=1)
        return replace(self, max_tiles=max_tiles)

    @classmethod
    def from_model_dir(cls, path: str | Path, **overrides: Any) -> TilingConfig:
        """Builds the config from a model directory; non-None overrides win.

        OpenGVLab's checkpoints (config.json `"model_type": "internvl_chat"`) keep their settings at
        the top level of config.json (`_opengvlab_values`); their CLIP-style
        `preprocessor_config.json` is not what their code tiles with, and is not read.

        Otherwise, as transformers saves a model: reads the nested `"image_processor"` dict of
        `processor_config.json` if there is one, else `preprocessor_config.json` (transformers' own
        priority); with neither, or for keys they lack, InternVL-hf's defaults apply. The file's
        `crop_to_patches` is deliberately ignored: `save_pretrained` writes GotOcr2's class default
        `false`, and `InternVLProcessor` overrides it with `True` on every call, so honouring it would
        silently turn tiling off. Pass `crop_to_patches=False` as an override to really disable it.
        """
        model_dir = Path(path)
        model_config = _read_json(model_dir / "config.json")
        if model_config.get("model_type") == "internvl_chat":
            values = _opengvlab_values(model_config)
        else:
            values = _config_values(_read_image_processor_dict(model_dir))
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


def _per_channel(value: float | tuple | list, name: str) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        value = (value,) * 3
    if len(value) != 3:
        raise ValueError(f"{name} needs one value per RGB channel, got {value!r}")
    return tuple(float(v) for v in value)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _opengvlab_values(config: dict[str, Any]) -> dict[str, Any]:
    """TilingConfig fields from the top level of OpenGVLab's config.json.

    Absent keys take the defaults of their `InternVLChatConfig`; the tile side is
    `force_image_size`, else the ViT's `image_size`. Mean, std, the bicubic filter and 1/255 are
    fixed in their `build_transform` (ImageNet's; TilingConfig's defaults).
    """
    vision = config.get("vision_config") or {}
    return {
        "tile_size": _square_tile_size(config.get("force_image_size") or vision.get("image_size", 448)),
        "crop_to_patches": bool(config.get("dynamic_image_size", False)),
        "use_thumbnail": bool(config.get("use_thumbnail", False)),
        "min_tiles": config.get("min_dynamic_patch", 1),
        "max_tiles": config.get("max_dynamic_patch", 6),
        "procedure": "opengvlab",
    }


def _read_image_processor_dict(model_dir: Path) -> dict[str, Any]:
    nested_file = model_dir / "processor_config.json"
    if nested_file.is_file():
        nested = json.loads(nested_file.read_text()).get("image_processor")
        if nested is not None:
            return nested
    flat_file = model_dir / "preprocessor_config.json"
    if flat_file.is_file():
        return json.loads(flat_file.read_text())
    return {}


def _config_values(raw: dict[str, Any]) -> dict[str, Any]:
    """Maps transformers' image-processor keys onto TilingConfig fields."""
    renames = {
        "min_patches": "min_tiles",
        "max_patches": "max_tiles",
        "image_mean": "image_mean",
        "image_std": "image_std",
        "rescale_factor": "rescale_factor",
        "resample": "resample",
    }
    values = {field: raw[key] for key, field in renames.items() if raw.get(key) is not None}
    if raw.get("size") is not None:
        values["tile_size"] = _square_tile_size(raw["size"])
    return values


def _square_tile_size(size: int | list[int] | dict[str, int]) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, list | tuple):  # OpenGVLab's image_size may be an [h, w] pair
        size = dict(zip(("height", "width"), size, strict=True))
    height, width = size.get("height"), size.get("width")
    if height is None or width is None or height != width:
        raise ValueError(f"InternVL tiles must be square {{height, width}}, got size={size!r}")
    return height


# ---------------------------------------------------------------------------------------------------
# Grid choice


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int, procedure: str) -> tuple[tuple[int, int], ...]:
    """(cols, rows) grids with min..max tiles, by tile count (a stable sort).

    Within one tile count the order matters: on an exact ratio tie between two grids of one count
    the first wins, or the last when the tie-break below moves on. Such ties need `min_tiles` >= 4
    (none with fewer, for grids up to 40 tiles): 500 x 200 at 4..4 ties 4x1 with 2x2.
    transformers lists them cols-major. OpenGVLab's `dynamic_preprocess` collects them in a Python
    set first, so they come in the set's iteration order, which follows CPython's tuple hashes and
    the order they went in; inserting the same tuples in the same order (by a growing bound on each
    side) reproduces it on this interpreter.
    """
    if procedure == "opengvlab":
        grids = set()
        for bound in range(min_tiles, max_tiles + 1):
            for cols in range(1, bound + 1):
                for rows in range(1, bound + 1):
                    if min_tiles <= cols * rows <= max_tiles:
                        grids.add((cols, rows))
    else:
        grids = [
            (cols, rows)
            for cols in range(1, max_tiles + 1)
            for rows in range(1, max_tiles + 1)
            if min_tiles <= cols * rows <= max_tiles
        ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def tile_grid(width: int, height: int, cfg: TilingConfig) -> tuple[int, int]:
    """The (cols, rows) grid the image is resized to; (1, 1) when not cropping to tiles."""
    if not cfg.crop_to_patches or cfg.max_tiles <= 1:
        return (1, 1)
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(cfg.min_tiles, cfg.max_tiles, cfg.procedure):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        # On an exact tie the larger grid wins while the image still covers more than half of it,
        # so large images get more resolution without tiling small ones excessively.
        elif diff == best_diff and area > 0.5 * cfg.tile_size * cfg.tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, cfg: TilingConfig) -> int:
    """Tiles `preprocess` returns for an image of this size, thumbnail included."""
    cols, rows = tile_grid(width, height, cfg)
    grid_tiles = cols * rows
    return grid_tiles + 1 if cfg.use_thumbnail and grid_tiles > 1 else grid_tiles


# ---------------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, max_pixels: int | None = None, procedure: str = "transformers") -> Image.Image:
    """Fully decodes untrusted bytes into an upright RGB image, or raises ImageError.

    Decoding everything now (rather than lazily) is what detects truncated files, and EXIF
    orientation is applied so the tiles match what a viewer shows. Transparency is handled as
    `procedure` does it (`to_rgb`).
    """
    if not data:
        raise ImageError("not a decodable image: the image data is empty")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Something in the process flipped PIL's global flag; truncated uploads would then decode
        # with grey fill instead of being rejected.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False for vlmd")
    image = _open(data)
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(width, height, max_pixels)
    _load(image)
    try:
        return to_rgb(ImageOps.exif_transpose(image), procedure)
    except MemoryError:
        raise
    except Exception as exc:  # malformed EXIF or an exotic mode PIL cannot convert
        raise ImageError(f"not a decodable image: {exc}") from exc


def _open(data: bytes) -> Image.Image:
    """Reads only the header: format, mode and size."""
    try:
        return Image.open(io.BytesIO(data), formats=_UPLOAD_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"not a decodable image: unrecognised or unsupported format (supported: {', '.join(_UPLOAD_FORMATS)})"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # PIL's plugins raise many types (SyntaxError, struct.error, ...)
        raise _decode_error(exc) from exc


def _load(image: Image.Image) -> None:
    """Decodes all pixel data, mapping PIL's errors to ImageError."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise _decode_error(exc) from exc


def _decode_error(exc: Exception) -> ImageError:
    # PIL reports truncation only in the message ("image file is truncated", "Truncated File Read").
    if "truncated" in str(exc).lower():
        return ImageError(f"truncated image: {exc}")
    return ImageError(f"not a decodable image: {exc}")


def to_rgb(image: Image.Image, procedure: str) -> Image.Image:
    """RGB as `procedure` makes it: transformers composites transparency onto white; OpenGVLab's
    `load_image` converts with PIL, which drops the alpha channel."""
    if procedure == "opengvlab":
        return image if image.mode == "RGB" else image.convert("RGB")
    return convert_to_rgb(image)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white, as transformers' `convert_to_rgb` does."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def fit_within(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size of the same aspect ratio with at most `max_pixels` pixels:
    (floor(width * s), floor(height * s)) with s = sqrt(max_pixels / (width * height)), at least 1 x 1."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_width, new_height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while new_width * new_height > max_pixels:  # float rounding up to an exact integer
        if new_width >= new_height:
            new_width -= 1
        else:
            new_height -= 1
    return new_width, new_height


def downscale(image: Image.Image, width: int, height: int) -> Image.Image:
    """What `"resize_to_fit": true` does to an image beyond --max_image_pixels: a bicubic resize of
    the decoded, upright RGB image (a client gets the same pixels by doing the same before sending)."""
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------------
# Tiling and normalisation


@lru_cache(maxsize=8)
def _normalize_lut(
    image_mean: tuple[float, float, float], image_std: tuple[float, float, float], rescale_factor: float
) -> np.ndarray:
    """[3, 256] float32: every normalised value a uint8 pixel of each channel can become.

    transformers computes `float32(float64(v) * factor)` then `(x - mean) / std` in float32; both
    are elementwise, correctly rounded IEEE operations, so evaluating them once per possible
    (channel, value) pair and gathering gives the same bits at a fraction of the cost. OpenGVLab's
    torchvision `ToTensor` divides in float32 instead (`float32(v) / 255`), which gives the same
    float32 for all 256 values at factor 1/255 (`tests/test_opengvlab_tiling.py` checks it).
    Keyed by what it depends on, not the whole config: per-request tile limits make many configs.
    """
    values = np.arange(256, dtype=np.uint8)
    rescaled = (values.astype(np.float64) * rescale_factor).astype(np.float32)  # [256]
    mean = np.array(image_mean, dtype=np.float32)[:, None]  # [3, 1]
    std = np.array(image_std, dtype=np.float32)[:, None]  # [3, 1]
    lut = (rescaled[None, :] - mean) / std  # [3, 256]
    assert lut.dtype == np.float32
    lut.flags.writeable = False
    return lut


def _resized_pixels(image: Image.Image, width: int, height: int, resample: int) -> np.ndarray:
    """[height, width, 3] uint8."""
    return np.asarray(image.resize((width, height), resample=resample))


def _split_tiles(pixels: np.ndarray, cols: int, rows: int, tile: int) -> np.ndarray:
    """[rows * tile, cols * tile, 3] -> [rows * cols, 3, tile, tile] view-or-copy, row-major tiles."""
    grid = pixels.reshape(rows, tile, cols, tile, 3)  # [rows, tile_y, cols, tile_x, C]
    grid = grid.transpose(0, 2, 4, 1, 3)  # [rows, cols, C, tile_y, tile_x]
    return grid.reshape(rows * cols, 3, tile, tile)  # [num_grid_tiles, C, tile, tile]


def tile_image(image: Image.Image, cfg: TilingConfig) -> np.ndarray:
    """An image's tiles before normalisation: uint8 `[num_tiles(w, h, cfg), 3, tile_size, tile_size]`,
    contiguous. A quarter of the float32 tiles' bytes: what travels through shared memory to the
    ViT, which normalises them on its device with `normalize_lut` (the same bits as `preprocess`)."""
    image = to_rgb(image, cfg.procedure)
    tile = cfg.tile_size
    cols, rows = tile_grid(image.width, image.height, cfg)
    pixels = _resized_pixels(image, cols * tile, rows * tile, cfg.resample)
    tiles = [_split_tiles(pixels, cols, rows, tile)]
    if cfg.use_thumbnail and cols * rows > 1:
        thumbnail = _resized_pixels(image, tile, tile, cfg.resample)
        tiles.append(_split_tiles(thumbnail, 1, 1, tile))
    out = np.concatenate(tiles) if len(tiles) > 1 else np.ascontiguousarray(tiles[0])  # [N, C, tile, tile]
    assert out.shape == (num_tiles(image.width, image.height, cfg), 3, tile, tile)
    return out


def normalize_lut(cfg: TilingConfig) -> np.ndarray:
    """[3, 256] float32, read-only: the normalised value of every uint8 pixel of each channel."""
    return _normalize_lut(cfg.image_mean, cfg.image_std, cfg.rescale_factor)


def preprocess(image: Image.Image, cfg: TilingConfig) -> np.ndarray:
    """Normalised tiles of an image: float32 `[num_tiles(w, h, cfg), 3, tile_size, tile_size]`."""
    uint8_tiles = tile_image(image, cfg)  # [N, C, tile, tile]
    channel = np.arange(3).reshape(1, 3, 1, 1)
    return normalize_lut(cfg)[channel, uint8_tiles]  # [N, C, tile, tile] float32, contiguous

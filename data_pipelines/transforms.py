"""Image decoding and transforms for the readers.

Fast path, per sample: ``decode_image`` (JPEG DCT-domain downscaling via ``Image.draft``) ->
``ImageTransform.geometry`` (one ``Image.resize`` with a crop box: crop and resize in one pass) ->
``to_uint8_hwc`` (a read-only array over one copy of the pixels, no per-pixel Python). The readers
normalise while batching, straight into the batch tensor: ``normalize_into`` (uint8 -> float and
x * scale + bias, image by image so the work stays in cache). ``ImageTransform.__call__`` chains
all of it for single images.

Horizontal flips are OFF by default: they silently break questions and statements about left and
right (VQAv2, NLVR2). Turn them on only for data where that cannot matter.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .safe_io import read_regular_file

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


#: Image formats the readers decode (detected by content): the ones the shard writers accept.
#: Other PIL plugins are never tried (EPS, for one, would run Ghostscript on the bytes). Camera
#: MPO files open through the JPEG entry.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

#: Largest image file ``read_image_file`` reads (the readers skip shard members above the same size).
MAX_IMAGE_FILE_BYTES = 256 << 20


def read_image_file(path: Union[str, "os.PathLike[str]"], max_bytes: Optional[int] = None) -> bytes:
    """The bytes of one image file, with bounded memory and no hang: ``FileNotFoundError`` when it
    does not exist, ``ValueError`` (naming the file) when it is not a regular file (a folder, FIFO,
    device: never opened for a blocking read), is empty, or is larger than ``max_bytes`` (default
    ``MAX_IMAGE_FILE_BYTES``)."""
    return read_regular_file(path, MAX_IMAGE_FILE_BYTES if max_bytes is None else max_bytes, what="image")


def decode_image(data: bytes, target_size: Optional[int] = None) -> Image.Image:
    """Decode image bytes (one of ``IMAGE_FORMATS``, detected by content) to an RGB PIL image.

    For JPEGs with ``target_size`` set, ``Image.draft`` lets libjpeg decode at 1/2, 1/4 or 1/8
    scale, the smallest that keeps both sides >= ``target_size``; that skips most of the inverse
    DCT and colour conversion work. Raises (``PIL.UnidentifiedImageError``, ``OSError``, ...) on
    bytes that are not a complete image, and ``PIL.Image.DecompressionBombError`` for images of
    more than ``Image.MAX_IMAGE_PIXELS`` pixels (PIL itself only refuses twice that), checked on
    the header before any pixel is decoded; the readers count those as corrupt images. Decoding
    memory is therefore bounded by about 7 bytes x ``Image.MAX_IMAGE_PIXELS`` (an RGBA frame and
    its RGB conversion), far less for JPEGs, which decode at reduced scale.
    """
    with warnings.catch_warnings():  # PIL warns above the limit; we refuse those images instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise Image.DecompressionBombError(f"{img.width}x{img.height} image: more than {limit} pixels")
    if target_size is not None and img.format == "JPEG":
        img.draft("RGB", (target_size, target_size))
    if img.mode != "RGB":
        img = img.convert("RGB")  # also loads; palette / grey / CMYK / alpha -> RGB
    else:
        img.load()
    return img


def to_uint8_hwc(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> read-only uint8 array (H, W, 3) over ``img.tobytes()`` (one copy; about
    half the cost of ``np.asarray(img)``, which goes through the same bytes and more)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}")
    width, height = img.size
    return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(height, width, 3)


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W); a permuted view of a writable copy of the pixels."""
    return torch.from_numpy(to_uint8_hwc(img).copy()).permute(2, 0, 1)


class Normalizer:
    """(x / 255 - mean) / std from uint8, per channel, as x * scale + bias."""

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        std_t = torch.tensor(self.std).view(3, 1, 1)
        mean_t = torch.tensor(self.mean).view(3, 1, 1)
        self.scale_C11 = 1.0 / (255.0 * std_t)
        self.bias_C11 = -mean_t / std_t

    def __call__(self, x_CHW: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 of the same shape, written into ``out`` when given.

        One converting copy (it also makes a permuted HWC view contiguous), then two in-place
        passes that stay in cache for one image (~90 us at 224 px on one core; a mixed-dtype
        ``addcmul`` measured ~105 us)."""
        if out is None:
            out = torch.empty(x_CHW.shape, dtype=torch.float32, device=x_CHW.device)
        out.copy_(x_CHW)
        scale, bias = self.scale_C11, self.bias_C11
        if scale.device != out.device:
            scale, bias = scale.to(out.device), bias.to(out.device)
        return out.mul_(scale).add_(bias)


def normalize_into(
    out_BCHW: torch.Tensor, images: Sequence[Union[torch.Tensor, np.ndarray]], normalizer: Normalizer
) -> torch.Tensor:
    """Normalise images into the rows of a preallocated float (B, 3, H, W) tensor. Images are uint8
    tensors (3, H, W) or uint8 arrays (H, W, 3), read-only ones included (``to_uint8_hwc``): those
    pass through one small reused staging buffer, since torch cannot wrap read-only memory."""
    stage_HWC: Optional[np.ndarray] = None
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            if stage_HWC is None or stage_HWC.shape != img.shape:
                stage_HWC = np.empty(img.shape, dtype=np.uint8)
                stage_CHW = torch.from_numpy(stage_HWC).permute(2, 0, 1)
            np.copyto(stage_HWC, img)
            normalizer(stage_CHW, out=out_BCHW[i])
        else:
            normalizer(img, out=out_BCHW[i])
    return out_BCHW


class ImageTransform:
    """Train (random resized crop) or eval (resize + centre crop) geometry, then to tensor.

    train: crop a random box of ``scale`` x the area with aspect in ``ratio`` and resize it to
    ``size`` x ``size`` (torchvision's RandomResizedCrop sampling), optional horizontal flip.
    eval: the centred square of side ``crop_pct`` x the short side, resized to ``size``
    (= resize the short side to size / crop_pct, then centre crop).
    """

    def __init__(
        self,
        size: int,
        train: bool,
        scale: Tuple[float, float] = (0.5, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = False,
        crop_pct: float = 1.0,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        self.size = size
        self.train = train
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.crop_pct = crop_pct
        self.resample = INTERPOLATIONS[interpolation]
        self.normalizer = Normalizer(mean, std)

    def crop_box(self, width: int, height: int, generator: Optional[torch.Generator] = None) -> Tuple[float, float, float, float]:
        """(left, top, right, bottom) in source pixels. Random draws come from ``generator`` (the
        readers pass their stream's; None: torch's global generator)."""
        if not self.train:
            side = min(width, height) * self.crop_pct
            left, top = (width - side) / 2, (height - side) / 2
            return left, top, left + side, top + side
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        u = torch.rand(10, 4, generator=generator).tolist()  # always 40 draws: a fixed count per image
        for us, ur, ux, uy in u:
            target = area * (self.scale[0] + us * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + ur * (log_hi - log_lo))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(ux * (width - w + 1))
                top = int(uy * (height - h + 1))
                return left, top, left + w, top + h
        # fallback: centre crop at the nearest allowed aspect ratio
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def geometry(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> Image.Image:
        """Crop + resize in one ``Image.resize`` call (box argument), then the optional flip."""
        box = self.crop_box(*img.size, generator=generator)
        out = img.resize((self.size, self.size), self.resample, box=box)
        if self.train and self.hflip and float(torch.rand((), generator=generator)) < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """Geometry, then a uint8 tensor (3, size, size)."""
        return to_uint8_chw(self.geometry(img))

    def to_array(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> np.ndarray:
        """Geometry, then a read-only uint8 array (size, size, 3): what the readers keep per
        sample (they normalise while batching)."""
        return to_uint8_hwc(self.geometry(img, generator))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Geometry, to tensor, normalise: float32 (3, size, size)."""
        return self.normalizer(self.to_uint8(img))


def train_transform(
    size: int,
    scale: Tuple[float, float] = (0.5, 1.0),
    hflip: bool = False,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> ImageTransform:
    """Random resized crop (``scale`` of the area, aspect 3/4..4/3); flip only when ``hflip``."""
    return ImageTransform(size, train=True, scale=scale, hflip=hflip, interpolation=interpolation, mean=mean, std=std)


def eval_transform(
    size: int,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> ImageTransform:
    """Resize the short side to ``size / crop_pct``, centre crop ``size`` (one resize call)."""
    return ImageTransform(size, train=False, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)

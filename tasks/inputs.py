"""Single inputs for prediction outside the data pipelines (``predict_one`` of the task modules,
``mmmoe predict``): an image file as the data modules' eval transform makes it, and text encoded
with the module's tokenizer."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]


def load_image(path: PathLike, image_size: int) -> Any:
    """One image file -> 1 x 3 x size x size float tensor: the datamodules' eval transform (resize the
    short side, centre crop) and ImageNet normalisation. Hostile files give a clear error and bounded
    memory: ``FileNotFoundError`` when missing, ``ValueError`` naming the file for a folder, FIFO or
    device, an empty or oversized file (``MAX_IMAGE_FILE_BYTES``), bytes that are no supported image,
    a truncated image or a decompression bomb (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels,
    refused before decoding)."""
    from data_pipelines.transforms import decode_image, eval_transform, read_image_file

    data = read_image_file(path)
    try:
        img = decode_image(data, target_size=image_size)
    except Exception as exc:  # PIL raises several types for undecodable data
        raise ValueError(f"image {str(path)!r} could not be decoded: {type(exc).__name__}: {exc}") from None
    return eval_transform(image_size)(img).unsqueeze(0)


def module_tokenizer(module: Any) -> Any:
    """The tokenizer named by the module's ``tokenizer`` hyperparameter (cached on the module)."""
    tok = getattr(module, "_predict_tokenizer", None)
    if tok is None:
        path = module.hparams.get("tokenizer")
        if not path:
            raise ValueError("the checkpoint names no tokenizer (hyperparameter 'tokenizer'); cannot encode text")
        from data_pipelines.tokenizer import Tokenizer

        tok = Tokenizer(path)
        module._predict_tokenizer = tok
    return tok


def encode_text_batch(module: Any, texts: Sequence[str], max_len: Optional[int] = None) -> Tuple[Any, Any]:
    """``[bos] + tokens + [eos]`` ids (B x L, right-padded) and padding mask (True = padding) on the
    module's device, cut to the model's ``max_text_len``."""
    from data_pipelines.readers import encode_text, pad_text

    tok = module_tokenizer(module)
    max_len = max_len or module.config.max_text_len
    ids, pad = pad_text([encode_text(tok, t, max_len) for t in texts], tok.pad_id)
    return ids.to(module.device), pad.to(module.device)

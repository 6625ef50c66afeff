"""The `images` field: data URIs checked, decoded to RGB pixels, and matched to markers.

Each image is a `data:image/<jpeg|png|webp|gif>;base64,...` URI and stands for
one `<image>` marker in the prompt. `images` is a flat list (taken in marker
order across the prompts) or, when `prompt` is a list, a list per prompt.
Every problem is a 400 naming it; decoding (Pillow) runs in a worker thread,
never on the event loop or the engine thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import WithJsonSchema

from fireside.api.errors import APIError
from fireside.engine.types import PromptImage

MARKER = "<image>"
_PARAM = "images"
_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
_DATA_URI = re.compile(rf"data:image/({'|'.join(_FORMATS)});base64,(.*)", re.DOTALL)
MAX_PIXELS = 4096 * 4096  # beyond this an image is refused, not resized

# The request field's type. Its schema documents what `decode` accepts; the check
# itself waits for `decode`, which runs only for a model that takes images.
DataURI = Annotated[
    str,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^data:image/({'|'.join(_FORMATS)});base64,",
            "description": "An image as a data URI: `data:image/<jpeg|png|webp|gif>;base64,...`.",
        }
    ),
]
Images = list[DataURI] | list[list[DataURI]]


def count_markers(text: str) -> int:
    return text.count(MARKER)


def assign(
    images: list[str] | list[list[str]] | None, prompts: Sequence[str | None]
) -> list[list[str]]:
    """The image URIs of each prompt, in marker order; 400 when counts do not match."""
    markers = [count_markers(p) if p is not None else 0 for p in prompts]
    if not images:
        if any(markers):
            raise APIError.invalid(
                f"the prompt has {sum(markers)} {MARKER} marker(s) but no images were given",
                _PARAM,
            )
        return [[] for _ in prompts]
    if all(isinstance(i, list) for i in images):
        per_prompt = [list(i) for i in images]  # type: ignore[arg-type]
        if len(per_prompt) != len(prompts):
            raise APIError.invalid(
                f"images has {len(per_prompt)} lists for {len(prompts)} prompts", _PARAM
            )
    elif all(isinstance(i, str) for i in images):
        flat: list[str] = list(images)  # type: ignore[arg-type]
        if len(flat) != sum(markers):
            raise APIError.invalid(
                f"{len(flat)} image(s) given for {sum(markers)} {MARKER} marker(s)", _PARAM
            )
        per_prompt, start = [], 0
        for count in markers:
            per_prompt.append(flat[start : start + count])
            start += count
        return per_prompt
    else:
        raise APIError.invalid("images must be strings, or one list of strings per prompt", _PARAM)
    for index, (uris, count) in enumerate(zip(per_prompt, markers, strict=True)):
        if len(uris) != count:
            raise APIError.invalid(
                f"prompt {index} has {count} {MARKER} marker(s) but {len(uris)} image(s)", _PARAM
            )
    return per_prompt


def decode(uri: Any, index: int, max_bytes: int) -> PromptImage:
    """One data URI to RGB pixels; a 400 naming the image and the problem otherwise."""
    where = f"images[{index}]"
    if not isinstance(uri, str):
        raise APIError.invalid(f"{where} must be a string data URI", _PARAM)
    match = _DATA_URI.fullmatch(uri.strip())
    if match is None:
        if uri.startswith("data:") and ";base64," in uri:
            mime = uri[5 : uri.index(";")]
            raise APIError.invalid(
                f"{where}: unsupported type {mime[:40]!r}; use image/jpeg, png, webp or gif",
                _PARAM,
            )
        raise APIError.invalid(f"{where} is not a data URI (data:image/<type>;base64,...)", _PARAM)
    kind, payload = match.groups()
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError.invalid(f"{where} is larger than {max_bytes} bytes", _PARAM)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError.invalid(f"{where} is not valid base64", _PARAM) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[_FORMATS[kind]]) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise APIError.invalid(
                        f"{where} is {img.width}x{img.height}; at most {MAX_PIXELS} pixels",
                        _PARAM,
                    )
                rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except APIError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Warning,
        Image.DecompressionBombError,
    ):
        raise APIError.invalid(f"{where} could not be decoded as image/{kind}", _PARAM) from None
    return PromptImage(rgb=np.ascontiguousarray(rgb), digest=hashlib.sha256(data).digest())

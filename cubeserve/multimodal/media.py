"""Loading media (images and videos) from what a request names, safely.

Public API
----------
``MediaError(ValueError)``
    Every problem with a piece of media (bad URL, forbidden or missing path, undecodable data,
    empty or truncated video, oversized image). The message is meant for the API client;
    ``param`` names the offending request field when known.
``MediaLimits(max_image_pixels=..., max_video_frames=..., max_media_bytes=...)``
    Size limits applied while loading and decoding.
``resolve_media_source(source, *, allowed_local_media_path=None, limits=MediaLimits())``
    -> ``bytes | Path``.
    Turns a URL / path / raw bytes into raw bytes (``data:`` URLs, bytes) or a checked local path.
    Local access (plain paths and ``file://`` URLs) is disabled unless ``allowed_local_media_path``
    is given, and then confined to that directory (symlinks and ``..`` are resolved first).
    ``http(s)://`` is rejected: the server has no network access.
``read_source_bytes(source: bytes | Path, *, limits) -> bytes``
``decode_image(data: bytes, *, limits) -> PIL.Image.Image``  (RGB; size checked before decoding)
``load_image(source, *, allowed_local_media_path=None, limits=MediaLimits()) -> PIL.Image.Image``
``to_pil_image(image: PIL.Image.Image | np.ndarray, *, limits) -> PIL.Image.Image`` (pre-decoded)
``content_hash(data, *, salt=b"") -> int``
    Stable 63-bit non-negative hash (fits an int64 tensor) of bytes / numpy arrays / CPU tensors,
    from BLAKE2b; arrays hash their dtype, shape and contents. Used for radix-cache pad values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MediaSource = str | bytes | bytearray | memoryview | os.PathLike

_REMOTE_SCHEMES = ("http", "https", "ftp", "ftps", "s3", "gs")


class MediaError(ValueError):
    """A media input that cannot be used; the message is safe to return to the client.

    ``param`` names the request field that holds the media (e.g.
    ``messages.0.content.1.video_url``) once the message processor knows it.
    """

    param: str | None = None


@dataclass(frozen=True)
class MediaLimits:
    max_image_pixels: int = 64 * 1024 * 1024  # width * height of one image or video frame
    max_video_frames: int = 4096  # frames decoded for one video
    max_media_bytes: int = 2 * 1024**3  # encoded size of one media file


# --------------------------------------------------------------------------- sources


def resolve_media_source(
    source: MediaSource,
    *,
    allowed_local_media_path: str | os.PathLike | None = None,
    limits: MediaLimits = MediaLimits(),
) -> bytes | Path:
    """Raw bytes for inline media, a confined and existing ``Path`` for local files."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(len(data), limits)
        return data
    if isinstance(source, os.PathLike):
        return resolve_local_path(source, allowed_local_media_path)
    if not isinstance(source, str):
        raise MediaError(f"unsupported media source of type {type(source).__name__}")

    scheme = _url_scheme(source)
    if scheme == "data":
        data = decode_data_url(source)
        _check_size(len(data), limits)
        return data
    if scheme == "file":
        return resolve_local_path(_file_url_path(source), allowed_local_media_path)
    if scheme in _REMOTE_SCHEMES:
        raise MediaError(
            f"{scheme}:// media URLs are not supported: this server cannot reach the network. "
            "Send the media inline as a data: URL (base64), or as a file under the server's "
            "--allowed-local-media-path"
        )
    if scheme:
        raise MediaError(f"unsupported media URL scheme {scheme!r}")
    return resolve_local_path(source, allowed_local_media_path)


def _url_scheme(url: str) -> str:
    head, sep, _ = url.partition(":")
    # One-letter "schemes" are Windows drive letters; anything with a slash is a path.
    if (
        not sep
        or len(head) < 2
        or not head.replace("+", "").replace("-", "").replace(".", "").isalnum()
    ):
        return ""
    return head.lower()


def decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("malformed data: URL (no ',' between header and data)")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"data: URL holds invalid base64: {exc}") from None
    return urllib.parse.unquote_to_bytes(payload)


def _file_url_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(f"file:// URL with a remote host {parsed.netloc!r} is not supported")
    return urllib.parse.unquote(parsed.path)


def resolve_local_path(
    path: str | os.PathLike, allowed_local_media_path: str | os.PathLike | None
) -> Path:
    """Resolve ``path`` (relative paths against the allowed directory) and confine it there."""
    if allowed_local_media_path is None:
        raise MediaError(
            "local media paths are disabled on this server (start it with "
            "--allowed-local-media-path DIR to allow files under DIR); "
            "send the media as a data: URL"
        )
    root = Path(allowed_local_media_path).expanduser().resolve()
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise MediaError(f"media path {str(path)!r} is outside the allowed media directory")
    if not resolved.is_file():
        raise MediaError(f"media file {str(path)!r} does not exist")
    return resolved


def read_source_bytes(source: bytes | Path, *, limits: MediaLimits = MediaLimits()) -> bytes:
    if isinstance(source, bytes):
        return source
    _check_size(source.stat().st_size, limits)
    try:
        return source.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read media file: {exc.strerror or exc}") from None


def _check_size(num_bytes: int, limits: MediaLimits) -> None:
    if num_bytes > limits.max_media_bytes:
        raise MediaError(
            f"media is {num_bytes} bytes, more than the limit of {limits.max_media_bytes} bytes"
        )


# --------------------------------------------------------------------------- images


def check_pixel_limit(width: int, height: int, limits: MediaLimits, what: str = "image") -> None:
    if width * height > limits.max_image_pixels:
        raise MediaError(
            f"{what} of {width}x{height} pixels is larger than the limit of "
            f"{limits.max_image_pixels} pixels"
        )


def decode_image(data: bytes, *, limits: MediaLimits = MediaLimits()) -> Image.Image:
    """Decode encoded image bytes into an RGB image (the size is checked before decoding)."""
    if not data:
        raise MediaError("image data is empty")
    with warnings.catch_warnings():
        # Our own pixel limit replaces PIL's decompression-bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # PIL's own, looser limit: report ours
            raise MediaError(
                f"image is larger than the limit of {limits.max_image_pixels} pixels"
            ) from None
        except UnidentifiedImageError:
            raise MediaError(
                "cannot decode image data: not an image, an unsupported format, or truncated"
            ) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise MediaError(f"cannot decode image data: {exc}") from None
        check_pixel_limit(*image.size, limits)
        try:
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise MediaError(f"image data is truncated or corrupt: {exc}") from None


def load_image(
    source: MediaSource,
    *,
    allowed_local_media_path: str | os.PathLike | None = None,
    limits: MediaLimits = MediaLimits(),
) -> Image.Image:
    resolved = resolve_media_source(
        source, allowed_local_media_path=allowed_local_media_path, limits=limits
    )
    return decode_image(read_source_bytes(resolved, limits=limits), limits=limits)


def to_pil_image(
    image: Image.Image | np.ndarray, *, limits: MediaLimits = MediaLimits()
) -> Image.Image:
    """Pre-decoded image (PIL image, or uint8 array HxWx3 RGB / HxW gray) -> RGB PIL image."""
    if isinstance(image, Image.Image):
        check_pixel_limit(*image.size, limits)
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if (
        array.dtype != np.uint8
        or array.ndim not in (2, 3)
        or (array.ndim == 3 and array.shape[2] not in (3, 4))
    ):
        raise MediaError(
            f"a pre-decoded image must be a uint8 array (H,W,3), got {array.dtype} {array.shape}"
        )
    check_pixel_limit(array.shape[1], array.shape[0], limits)
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


# --------------------------------------------------------------------------- hashing


def content_hash(data: bytes | bytearray | memoryview | np.ndarray, *, salt: bytes = b"") -> int:
    """Stable 63-bit non-negative content hash (identical across processes and runs)."""
    digest = hashlib.blake2b(salt, digest_size=8)
    if isinstance(data, (bytes, bytearray, memoryview)):
        digest.update(b"bytes:")
        digest.update(data)
    else:
        if hasattr(data, "detach"):  # torch.Tensor, without importing torch here
            data = data.detach().cpu().numpy()
        array = np.ascontiguousarray(data)
        digest.update(f"array:{array.dtype.str}:{array.shape}:".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)

"""Small synthetic media files for tests that feed real files to the video decoder."""

from __future__ import annotations

import io

import av
import numpy as np

SCENE_COLORS = ((220, 30, 30), (30, 200, 40), (30, 60, 220), (240, 220, 20), (200, 40, 200))
CLIP_SECONDS, CLIP_FPS = 5, 10


def encode_scenes(
    num_frames: int = CLIP_SECONDS * CLIP_FPS, rate: int = CLIP_FPS, size_wh: tuple[int, int] = (64, 48)
) -> bytes:
    """An mp4 of equally long single-colour scenes (H.264 when this PyAV has it)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = *size_wh, "yuv420p"
        container.start_encoding()
        for i in range(num_frames):
            frame = np.empty((size_wh[1], size_wh[0], 3), np.uint8)
            frame[:] = SCENE_COLORS[i * len(SCENE_COLORS) // num_frames]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()

"""Ask a question about a local video through a running cubeserve server (OpenAI API).

    cubeserve serve --allowed-local-media-path ~/videos     # demo model; or --model-path ...
    python examples/video_qa.py ~/videos/match.mp4 "When is the first goal scored?"

The video is sent as a file:// URL, read by the server from under its --allowed-local-media-path;
``--inline`` sends the file's bytes instead (a data: URL), for servers without local media access.
The answer streams as it is generated; then the segments ("cubes") the model cut the video into.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
from pathlib import Path

from openai import OpenAI


def video_url(path: Path, inline: bool) -> str:
    if not inline:
        return path.resolve().as_uri()
    mime = mimetypes.guess_type(path.name)[0] or "video/mp4"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", type=Path)
    parser.add_argument("question")
    parser.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    parser.add_argument("--api-key", default=os.environ.get("CUBESERVE_API_KEY", "none"))
    parser.add_argument("--model", help="default: the model the server serves")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    parser.add_argument("--max-frames", type=int, help="at most this many frames (default: the server's)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--inline", action="store_true", help="send the video bytes as a data: URL")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    video = {"url": video_url(args.video, args.inline), "fps": args.fps}
    if args.max_frames is not None:
        video["max_frames"] = args.max_frames
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": video},
            {"type": "text", "text": args.question},
        ]}],
        max_tokens=args.max_tokens,
        stream=True,
        extra_body={"return_cubes": True},  # cubeserve extension: the cube segmentation of each video
    )
    cubes = None
    for chunk in stream:
        cubes = cubes or (chunk.model_extra or {}).get("cubes")
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    for index, cube in enumerate(cubes[0] if cubes else []):
        print(f"cube {index}: frames {cube['start_frame']}-{cube['end_frame'] - 1}, "
              f"{cube['start_time']:.1f}s - {cube['end_time']:.1f}s")


if __name__ == "__main__":
    main()

"""Golden runner: one Quicksviewer golden case through the real engine path, written like ``expected/``.

    python -m cubeserve.tools.golden CASE_DIR --out OUT_DIR [--model-path DIR] [--compare]

Model cases (``input/request.json`` with modality ``video`` / ``image`` / ``text``): the request
becomes OpenAI-style chat messages; the server's messages processor builds the prompt and the
pixels, and an in-process ``Scheduler`` + ``ModelRunner`` (built as the engine process builds
them) encodes the media, prefills and decodes greedily. Forward hooks observe what the model
computes: the rows entering the first decoder layer (``inputs_embeds``), the logits of every
step, the vision tower output and the cubing scores. ``OUT_DIR`` receives ``expected.json`` and
``tensors.npz`` under the names of the golden README (section 9).

Sampling cases (modality ``video_sampling``): the PyAV frame sampler runs for every requested
``(num_frames, fps)``; frame indices are read back from the clip's pixel code.

``compare(expected_dir, out_dir) -> list[str]`` lists the differences between a case's expected
folder and an output folder: discrete values must be equal, float arrays within the README's
recommended absolute tolerances (section 6). ``--compare`` runs it and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cubeserve.engine.forward_batch import ForwardMode
from cubeserve.engine.io_struct import TokenizedGenerateReq, new_request_id
from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.models.quicksviewer_vision import CubingResult
from cubeserve.multimodal.processors import create_multimodal_processor, engine_inputs
from cubeserve.multimodal.processors.quicksviewer import (
    IMAGE_PLACEHOLDER_ID,
    ProcessedRequest,
    cube_bounds_as_returned,
    kept_timestamps,
    postprocess_output_ids,
)
from cubeserve.multimodal.video import read_video
from cubeserve.scheduler.scheduler import build_scheduler
from cubeserve.server_args import ServerArgs

# KV pool of the in-process engine: room for any golden-sized request, quick to allocate.
KV_POOL_TOKENS = 1 << 16

# README section 6, "recommended atol" (rtol 0).
TENSOR_ATOL = {
    "pixel_values": 1e-6,
    "vision_tower_out_first": 1e-4,
    "cubing_z_logits": 1e-4,
    "cubing_y_prob": 2e-5,
    "inputs_embeds": 1e-4,
    "last_prompt_logits": 1e-3,
    "step_logits": 1e-3,
}
# README section 9: what every runner must write. Other known items are compared when written.
REQUIRED_KEYS = (
    "prompt",
    "input_ids",
    "layout_after_cube_merge.input_ids",
    "generated.raw_output_ids",
    "generated.text",
)
REQUIRED_VIDEO_KEYS = ("video.cube_bound_as_returned", "video.kept_timestamps")
OPTIONAL_KEYS = (
    "num_image_placeholders_in_input_ids",
    "pixel_values_shape",
    "image_sizes_wh",
    "imidx_in_multi",
    "video.num_frames",
    "video.timestamps",
    "video.cubing.num_boundaries_topk",
    "video.cubing.selected_transitions",
    "video.cubing.boundary_frames",
    "video.cubing.frame_bounds",
    "video.videos_bound_after_cubing",
    "layout_after_cube_merge.num_image_placeholders",
    "inputs_embeds.shape",
    "last_prompt_logits.shape",
    "generated.num_new_tokens",
    "generated.stopped_on_eos",
)
REQUIRED_TENSORS = ("inputs_embeds", "last_prompt_logits")

# The sampling clip's frame code (README 5.13): bit b of the frame index is block b, row-major,
# of 16x16 blocks, white when set; read from the mean of each block's inner 8x8 pixels.
INDEX_BITS = 12
INDEX_BLOCK = 16

_MISSING = object()


# --------------------------------------------------------------------------- observing the model


@dataclass
class _LMForward:
    mode: ForwardMode
    input_rows: torch.Tensor  # what enters the first decoder layer
    logits: torch.Tensor | None = None


class ModelObserver:
    """Forward hooks recording what the model computes while the scheduler drives it.

    Observes one request at a time: every forward's rows and logits are taken as that
    request's. Media served from the encoder cache run no vision forward, so record nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        self.forwards: list[_LMForward] = []
        self.vision_tower_out_first: torch.Tensor | None = None
        self.cubing: list[CubingResult] = []
        language_model = getattr(model, "language_model", model)
        self._handles = [
            language_model.model.layers[0].register_forward_pre_hook(self._on_first_layer),
            language_model.lm_head.register_forward_hook(self._on_lm_head),
        ]
        vision = getattr(model, "vision", None)
        if vision is not None:
            self._handles += [
                vision.resampler.register_forward_pre_hook(self._on_resampler),
                vision.cubing.register_forward_hook(self._on_cubing),
            ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _on_first_layer(self, module: nn.Module, args: tuple) -> None:
        hidden, batch = args[0], args[-1]
        self.forwards.append(_LMForward(batch.mode, _host(hidden)))

    def _on_lm_head(self, module: nn.Module, args: tuple, logits: torch.Tensor) -> None:
        self.forwards[-1].logits = _host(logits)

    def _on_resampler(self, module: nn.Module, args: tuple) -> None:
        if self.vision_tower_out_first is None:  # (frames or views, 576, Dv) tower features
            self.vision_tower_out_first = _host(args[0][0])

    def _on_cubing(self, module: nn.Module, args: tuple, result: CubingResult) -> None:
        self.cubing.append(
            CubingResult(
                _host(result.z_logits),
                _host(result.y_prob),
                result.start_frames,
                result.frame_bounds,
            )
        )

    def inputs_embeds(self) -> torch.Tensor:
        """(L, hidden): the prompt rows of every prefill chunk, in order."""
        return torch.cat([f.input_rows for f in self.forwards if f.mode is ForwardMode.EXTEND])

    def step_logits(self, num_new_tokens: int) -> torch.Tensor:
        """(num_new_tokens, vocab): row 0 from the last prefill chunk, row i after token i-1."""
        prefill = [f for f in self.forwards if f.mode is ForwardMode.EXTEND]
        decode = [f for f in self.forwards if f.mode is ForwardMode.DECODE]
        if len(decode) != num_new_tokens - 1:
            raise RuntimeError(f"{len(decode)} decode steps for {num_new_tokens} new tokens")
        return torch.stack([prefill[-1].logits[-1]] + [f.logits[0] for f in decode])


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().cpu().clone()


# --------------------------------------------------------------------------- the engine


@dataclass
class RequestTrace:
    """One greedy request as the engine ran it."""

    processed: ProcessedRequest  # prompt, token ids with -200 placeholders, media
    layout_ids: list[int]  # the prompt the LM ran, each media block shown as one -200
    output_ids: list[int]
    finish_reason: dict[str, Any]
    frame_bounds: list[list[list[int]]]  # per video, its cubes as [start, end) frames
    inputs_embeds: torch.Tensor  # (L, hidden)
    step_logits: torch.Tensor  # (len(output_ids), vocab)
    vision_tower_out_first: torch.Tensor | None = None
    cubing: list[CubingResult] = field(default_factory=list)


class TracingEngine:
    """The engine process's scheduler and model runner, in this process, with a model observer.

    Requests take the server's path: the messages processor the frontend uses, then the
    scheduler (multimodal encode stage, chunked prefill) and the model runner. Each request
    starts with an empty prefix cache; media seen before come from the encoder cache, so their
    vision results are not observed again.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        chat_template: str | None = None,
        device: str = "cpu",
        allowed_local_media_path: str | Path | None = None,
    ) -> None:
        self.server_args = ServerArgs(
            model_path=str(model_path),
            chat_template=chat_template,
            dtype="float32",
            device=device,
            max_total_tokens=KV_POOL_TOKENS,
            max_running_requests=1,
            disable_cuda_graph=True,  # graph replays would bypass the hooks
            enable_overlap_schedule=False,  # it would run one forward past a stop token
            allowed_local_media_path=(
                None if allowed_local_media_path is None else str(allowed_local_media_path)
            ),
        )
        self.scheduler = build_scheduler(self.server_args)
        self.tokenizer = self.scheduler.tokenizer
        processor = create_multimodal_processor(self.server_args, self.tokenizer)
        if processor is None:
            raise ValueError(f"{model_path} is not a Quicksviewer checkpoint")
        self.processor = processor

    def generate(self, messages: list[dict[str, Any]], max_new_tokens: int) -> RequestTrace:
        """Greedy decoding of the chat ``messages``; raises RuntimeError if the engine aborts."""
        processed = self.processor.process(messages)
        input_ids, mm_inputs = engine_inputs(processed)
        params = SamplingParams.from_dict(
            {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        ).normalize()
        params.verify(self.scheduler.runner.vocab_size)
        # A cached prefix would not be recomputed, so its rows would be missing from the trace.
        self.scheduler.flush_cache()
        observer = ModelObserver(self.scheduler.runner.model)
        try:
            req = self.scheduler.add_request(
                TokenizedGenerateReq(new_request_id(), input_ids, params, mm_inputs=mm_inputs)
            )
            while self.scheduler.has_work:
                self.scheduler.step()
        finally:
            observer.close()
        if req.finish_reason.type == "abort":
            raise RuntimeError(f"the engine aborted the request: {req.finish_reason.message}")
        cubes = (req.mm_meta or {}).get("cubes", [])
        return RequestTrace(
            processed=processed,
            layout_ids=self._layout(req.origin_input_ids, req.mm_mask),
            output_ids=list(req.output_ids),
            finish_reason=req.finish_reason.to_dict(),
            frame_bounds=[[[c["start_frame"], c["end_frame"]] for c in video] for video in cubes],
            inputs_embeds=observer.inputs_embeds(),
            step_logits=observer.step_logits(len(req.output_ids)),
            vision_tower_out_first=observer.vision_tower_out_first,
            cubing=observer.cubing,
        )

    def _layout(self, ids: list[int], mm_mask: torch.Tensor | None) -> list[int]:
        """``ids`` with each block of media pad ids shown as one -200 placeholder."""
        if mm_mask is None:
            return list(ids)
        block_len = self.scheduler.mm_encoder.num_queries
        layout: list[int] = []
        media_rows = 0
        for token, is_media in zip(ids, mm_mask.tolist(), strict=True):
            if not is_media:
                layout.append(token)
                continue
            if media_rows % block_len == 0:
                layout.append(IMAGE_PLACEHOLDER_ID)
            media_rows += 1
        return layout


# --------------------------------------------------------------------------- model cases


def case_messages(case_dir: Path, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's turns as chat messages; the visual input opens the first user turn.

    Images are named by file, relative to ``input/`` (the engine serves that directory).
    """
    media: list[dict[str, Any]] = []
    if request["modality"] == "video":
        frames = np.load(case_dir / "input" / request.get("frames_file", "frames.npy"))
        video: dict[str, Any] = {"type": "video", "video": frames}
        if request.get("timestamps") is not None:
            video["timestamps"] = request["timestamps"]
        media = [video]
    elif request["modality"] == "image":
        media = [
            {"type": "image_url", "image_url": {"url": name}} for name in request["image_files"]
        ]
    messages: list[dict[str, Any]] = []
    for k, turn in enumerate(request["turns"]):
        parts = (media if k == 0 else []) + [{"type": "text", "text": turn["user"]}]
        messages.append({"role": "user", "content": parts})
        if turn.get("assistant") is not None:
            messages.append({"role": "assistant", "content": turn["assistant"]})
    return messages


def run_model_case(
    case_dir: Path, request: dict[str, Any], model_dir: Path, device: str = "cpu"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``expected.json`` content and ``tensors.npz`` arrays for one model case."""
    engine = TracingEngine(
        model_dir,
        chat_template=request.get("conv_template"),
        device=device,
        allowed_local_media_path=case_dir / "input",
    )
    trace = engine.generate(case_messages(case_dir, request), request.get("max_new_tokens", 16))
    result = {
        "case": case_dir.name,
        "modality": request["modality"],
        "conv_template": request.get("conv_template"),
        **_prompt_section(trace.processed),
        **({"video": _video_section(trace)} if trace.processed.video_spans else {}),
        **_model_section(trace),
        "generated": _generated_section(trace, engine),
        "runtime": {
            "engine": "cubeserve",
            "device": str(engine.scheduler.runner.device),
            "dtype": "float32",
            "torch": torch.__version__,
        },
    }
    return result, _tensors(trace)


def _prompt_section(processed: ProcessedRequest) -> dict[str, Any]:
    section: dict[str, Any] = {
        "prompt": processed.prompt,
        "input_ids": processed.input_ids,
        "num_image_placeholders_in_input_ids": processed.input_ids.count(IMAGE_PLACEHOLDER_ID),
    }
    if processed.media:
        section |= {
            "pixel_values_shape": list(processed.pixel_values.shape),
            "image_sizes_wh": [[list(s) for item in processed.media for s in item.image_sizes]],
            "imidx_in_multi": [processed.imidx_in_multi],
        }
    return section


def _model_section(trace: RequestTrace) -> dict[str, Any]:
    last_logits = trace.step_logits[0]
    top5 = torch.topk(last_logits, min(5, last_logits.numel()))
    return {
        "layout_after_cube_merge": {
            "input_ids": trace.layout_ids,
            "num_image_placeholders": trace.layout_ids.count(IMAGE_PLACEHOLDER_ID),
        },
        "inputs_embeds": {"shape": list(trace.inputs_embeds.shape)},
        "last_prompt_logits": {
            "shape": list(last_logits.shape),
            "top5_ids": top5.indices.tolist(),
            "top5_values": top5.values.tolist(),
        },
    }


def _generated_section(trace: RequestTrace, engine: TracingEngine) -> dict[str, Any]:
    eos_ids = engine.scheduler.eos_token_ids
    reason = trace.finish_reason
    return {
        "raw_output_ids": trace.output_ids,
        "num_new_tokens": len(trace.output_ids),
        "stopped_on_eos": reason["type"] == "stop" and reason["matched"] in eos_ids,
        "text": postprocess_output_ids(trace.output_ids, engine.tokenizer, eos_ids),
    }


def _tensors(trace: RequestTrace) -> dict[str, np.ndarray]:
    tensors = {
        "inputs_embeds": trace.inputs_embeds.numpy(),
        "last_prompt_logits": trace.step_logits[0].numpy(),
        "step_logits": trace.step_logits.numpy(),
    }
    if trace.processed.media:
        tensors["pixel_values"] = trace.processed.pixel_values.numpy()
        tensors["vision_tower_out_first"] = trace.vision_tower_out_first.numpy()
    if trace.processed.video_spans:
        tensors["cubing_z_logits"] = trace.cubing[0].z_logits.numpy()
        tensors["cubing_y_prob"] = trace.cubing[0].y_prob.numpy()
    return tensors


def _video_section(trace: RequestTrace) -> dict[str, Any]:
    """The golden ``video`` block; a golden request holds exactly one video."""
    (video,) = [item for item in trace.processed.media if item.kind == "video"]
    (bounds,) = trace.frame_bounds
    boundary_frames = [start for start, _ in bounds[1:]]
    return {
        "num_frames": video.num_views,
        "timestamps": video.timestamps,
        "cubing": {
            "num_boundaries_topk": len(boundary_frames),
            "selected_transitions": [frame - 1 for frame in boundary_frames],
            "boundary_frames": boundary_frames,
            "frame_bounds": bounds,
        },
        "videos_bound_after_cubing": [list(span) for span in trace.processed.video_spans],
        "cube_bound_as_returned": [cube_bounds_as_returned(bounds, video.has_thumbnail)],
        "kept_timestamps": kept_timestamps(video.timestamps, bounds),
    }


# --------------------------------------------------------------------------- sampling cases


def decode_frame_index(frame: np.ndarray) -> int:
    """The frame index written into a sampling clip's pixels (README 5.13)."""
    per_row = frame.shape[1] // INDEX_BLOCK
    index = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, per_row)
        y, x = row * INDEX_BLOCK + INDEX_BLOCK // 4, col * INDEX_BLOCK + INDEX_BLOCK // 4
        if frame[y : y + INDEX_BLOCK // 2, x : x + INDEX_BLOCK // 2].mean() > 127:
            index |= 1 << bit
    return index


def run_sampling_case(case_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    """``expected.json`` content for a frame-sampling case."""
    video_path = case_dir / request["video_file"]
    results = []
    for entry in request["requests"]:
        video = read_video(video_path, fps=entry["fps"], num_frames=entry["num_frames"])
        results.append(
            {
                "num_frames": entry["num_frames"],
                "fps": entry["fps"],
                "frame_indices": [decode_frame_index(frame) for frame in video.frames],
                "sampled_frame_indices": video.frame_indices,  # what the sampler meant to decode
                "timestamps": video.timestamps,
                "num_returned": video.num_frames,
                "frame_shape": list(video.frames.shape[1:]),
            }
        )
    return {"case": case_dir.name, "modality": "video_sampling", "results": results}


# --------------------------------------------------------------------------- running a case


def is_sampling_request(request: dict[str, Any]) -> bool:
    return request.get("modality") == "video_sampling" or "requests" in request


def run_case(
    case_dir: str | Path,
    out_dir: str | Path,
    *,
    model_dir: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """Run the case in ``case_dir`` and write its outputs to ``out_dir``; returns ``out_dir``.

    ``model_dir`` replaces the case's ``model/`` (e.g. the checkpoint after ``cubeserve convert``).
    """
    case_dir, out_dir = Path(case_dir), Path(out_dir)
    request = _read_json(case_dir / "input" / "request.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_sampling_request(request):
        result = run_sampling_case(case_dir, request)
    else:
        result, tensors = run_model_case(
            case_dir, request, Path(model_dir) if model_dir else case_dir / "model", device
        )
        np.savez(out_dir / "tensors.npz", **tensors)
    (out_dir / "expected.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return out_dir


def expected_dir_of(case_dir: str | Path) -> Path:
    """Where a case keeps its expected outputs: ``expected/``, or the case itself (sampling)."""
    case_dir = Path(case_dir)
    return case_dir / "expected" if (case_dir / "expected").is_dir() else case_dir


# --------------------------------------------------------------------------- comparing


def compare(expected_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Differences between a case's expected outputs and a runner's; empty when they match."""
    expected_dir, out_dir = Path(expected_dir), Path(out_dir)
    if not (out_dir / "expected.json").is_file():
        return [f"{out_dir / 'expected.json'} is missing"]
    expected = _read_json(expected_dir / "expected.json")
    produced = _read_json(out_dir / "expected.json")
    if "results" in expected:
        return _compare_sampling(expected["results"], produced.get("results", []))
    return _compare_json(expected, produced) + _compare_tensors(
        expected_dir / "tensors.npz",
        out_dir / "tensors.npz",
        required=REQUIRED_TENSORS + (("pixel_values",) if "pixel_values_shape" in expected else ()),
    )


def _compare_json(expected: dict[str, Any], produced: dict[str, Any]) -> list[str]:
    required = REQUIRED_KEYS + (REQUIRED_VIDEO_KEYS if "video" in expected else ())
    mismatches = []
    for key in required + OPTIONAL_KEYS:
        want, got = _lookup(expected, key), _lookup(produced, key)
        if want is _MISSING or (got is _MISSING and key not in required):
            continue
        if got is _MISSING:
            mismatches.append(f"{key}: missing")
        elif got != want:
            mismatches.append(f"{key}: {_difference(want, got)}")
    return mismatches


def _compare_tensors(expected_path: Path, out_path: Path, required: Sequence[str]) -> list[str]:
    if not out_path.is_file():
        return [f"{out_path} is missing"]
    with np.load(expected_path) as expected, np.load(out_path) as produced:
        mismatches = []
        for name, atol in TENSOR_ATOL.items():
            if name not in expected.files:
                continue
            if name not in produced.files:
                if name in required:
                    mismatches.append(f"tensors.npz[{name}]: missing")
                continue
            want, got = expected[name], produced[name]
            if want.shape != got.shape:
                mismatches.append(f"tensors.npz[{name}]: shape {got.shape}, expected {want.shape}")
                continue
            error = float(np.abs(want.astype(np.float64) - got).max()) if want.size else 0.0
            if not error <= atol:
                mismatches.append(f"tensors.npz[{name}]: max abs difference {error:.3g} > {atol:g}")
        return mismatches


def _compare_sampling(expected: list[dict], produced: list[dict]) -> list[str]:
    """Frame indices and timestamps per request; requests the original failed are skipped."""
    if len(produced) != len(expected):
        return [f"results: {len(produced)} entries, expected {len(expected)}"]
    mismatches = []
    for k, (want, got) in enumerate(zip(expected, produced)):
        label = f"results[{k}] (num_frames={want['num_frames']}, fps={want['fps']})"
        if (got.get("num_frames"), got.get("fps")) != (want["num_frames"], want["fps"]):
            mismatches.append(f"{label}: got the request {got.get('num_frames')}, {got.get('fps')}")
            continue
        if "error" in want:  # the original crashed here; nothing to match
            continue
        for key in ("frame_indices", "timestamps"):
            if got.get(key) != want[key]:
                mismatches.append(f"{label}.{key}: {_difference(want[key], got.get(key))}")
    return mismatches


def _lookup(tree: dict[str, Any], dotted_key: str) -> Any:
    node: Any = tree
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _difference(want: Any, got: Any) -> str:
    if isinstance(want, list) and isinstance(got, list):
        first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if first is None:
            return f"length {len(got)}, expected {len(want)}"
        return (
            f"first difference at [{first}]: {_short(got[first])}, expected {_short(want[first])}"
        )
    return f"{_short(got)}, expected {_short(want)}"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cubeserve.tools.golden",
        description="Run one Quicksviewer golden case through cubeserve and write its outputs "
        "in the format of the case's expected/ folder.",
    )
    parser.add_argument("case_dir", type=Path, help="golden case directory (with input/)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--model-path", type=Path, default=None, help="checkpoint to use instead of CASE_DIR/model"
    )
    parser.add_argument("--device", default="cpu", help="cpu (the goldens' device), cuda, ...")
    parser.add_argument(
        "--compare", action="store_true", help="compare with the case's expected outputs"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_case(args.case_dir, args.out, model_dir=args.model_path, device=args.device)
    print(f"wrote {args.out}")
    if not args.compare:
        return 0
    mismatches = compare(expected_dir_of(args.case_dir), args.out)
    for mismatch in mismatches:
        print(f"MISMATCH {mismatch}")
    print(f"{args.case_dir.name}: " + (f"{len(mismatches)} mismatches" if mismatches else "match"))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())

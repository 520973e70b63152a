"""Batched next-token sampling for one forward's last-token logits.

Processing order (vLLM's): logit bias -> repetition / frequency / presence penalties ->
temperature -> top-k, top-p, min-p -> one draw per request. The three filters are each computed
on the same temperature-scaled distribution and the kept set is their intersection (SGLang's
torch sampler does the same), so their order does not matter.

Draws use the exponential-race trick (``argmax(p / E)``, ``E ~ Exp(1)``), which samples from ``p``
in one vectorised op. A seeded request fills its noise row from its own generator, always in
vocabulary order and always ``vocab_size`` values per step, so its tokens depend only on its seed
and its logits, never on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import torch

from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.utils import to_device


class SamplingReq(Protocol):
    sampling_params: SamplingParams
    origin_input_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    return_logprob: bool
    top_logprobs_num: int


@dataclass
class SampleOutput:
    next_token_ids: list[int]
    # Log-softmax of the raw logits (before bias, penalties and temperature) at the chosen token.
    logprobs: list[float] | None = None
    # Per request, its ``top_logprobs_num`` most likely (token id, raw logprob) pairs.
    top_logprobs: list[list[tuple[int, float]]] | None = None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The private RNG of a seeded request; ``None`` means "use the global RNG"."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    def sample(self, logits: torch.Tensor, reqs: Sequence[SamplingReq]) -> SampleOutput:
        """One token per row of ``logits`` ([batch, vocab] float32), which is not modified."""
        return self.sample_async(logits, reqs).wait()

    def sample_async(self, logits: torch.Tensor, reqs: Sequence[SamplingReq]) -> PendingSample:
        """``sample`` with the results left on the device until ``PendingSample.wait``."""
        params = [req.sampling_params for req in reqs]
        adjusted = adjust_logits(logits, reqs)
        if all(p.is_greedy for p in params):
            next_ids = adjusted.argmax(dim=-1)
        else:
            next_ids = _sample_mixed(adjusted, reqs)
        return _pending_output(logits, next_ids, reqs)


class PendingSample:
    """One forward's sampled tokens (and logprobs) on their way to the host.

    The copies queue behind the sampling kernels, so the host can launch the next forward,
    which reads the tokens from ``next_ids`` on the device, before they land.
    """

    def __init__(
        self,
        next_ids: torch.Tensor,
        logprobs: torch.Tensor | None,
        top: tuple[torch.Tensor, torch.Tensor] | None,
        top_nums: list[int],
    ) -> None:
        self.next_ids = next_ids
        self._top_nums = top_nums
        on_device = [next_ids, logprobs, *(top or ())]
        self._host = [t.to("cpu", non_blocking=True) if t is not None else None for t in on_device]
        self._copied: torch.cuda.Event | None = None
        if next_ids.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def wait(self) -> SampleOutput:
        if self._copied is not None:
            self._copied.synchronize()
        next_ids, logprobs, *top = self._host
        output = SampleOutput(next_ids.tolist())
        if logprobs is not None:
            output.logprobs = logprobs.tolist()
        if top:
            top_ids, top_values = (t.tolist() for t in top)
            output.top_logprobs = [
                list(zip(ids[:n], values[:n]))
                for n, ids, values in zip(self._top_nums, top_ids, top_values)
            ]
        return output


def adjust_logits(logits: torch.Tensor, reqs: Sequence[SamplingReq]) -> torch.Tensor:
    """Apply logit bias and penalties; returns ``logits`` itself when no request uses them."""
    biased = [i for i, req in enumerate(reqs) if req.sampling_params.logit_bias]
    penalized = [i for i, req in enumerate(reqs) if req.sampling_params.has_penalties]
    if not biased and not penalized:
        return logits
    logits = logits.clone()
    if biased:
        _apply_logit_bias(logits, biased, [reqs[i].sampling_params.logit_bias for i in biased])
    if penalized:
        _apply_penalties(logits, penalized, [reqs[i] for i in penalized])
    return logits


def _apply_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[dict[int, float]]) -> None:
    device = logits.device
    row_ids = [row for row, bias in zip(rows, biases) for _ in bias]
    token_ids = [token_id for bias in biases for token_id in bias]
    values = [value for bias in biases for value in bias.values()]
    index = (to_device(row_ids, torch.long, device), to_device(token_ids, torch.long, device))
    logits.index_put_(index, to_device(values, logits.dtype, device), accumulate=True)


def _apply_penalties(logits: torch.Tensor, rows: list[int], reqs: list[SamplingReq]) -> None:
    """Penalise the ``rows`` of ``logits`` in place (``reqs[i]`` belongs to ``rows[i]``)."""
    device, vocab_size = logits.device, logits.shape[-1]
    params = [req.sampling_params for req in reqs]
    row_index = to_device(rows, torch.long, device)
    sub = logits.index_select(0, row_index)
    output_counts = _token_counts([req.output_ids for req in reqs], vocab_size, device)

    if any(p.repetition_penalty != 1.0 for p in params):
        # HF: a token seen in the prompt or the output has its logit divided by the penalty
        # when positive and multiplied by it when negative.
        prompt_counts = _token_counts([req.origin_input_ids for req in reqs], vocab_size, device)
        seen = (prompt_counts > 0) | (output_counts > 0)
        penalty = _column([p.repetition_penalty for p in params], logits.dtype, device)
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)

    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        # OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty.
        frequency = _column([p.frequency_penalty for p in params], logits.dtype, device)
        presence = _column([p.presence_penalty for p in params], logits.dtype, device)
        sub = sub - output_counts * frequency - (output_counts > 0).to(sub.dtype) * presence

    logits.index_copy_(0, row_index, sub)


def _token_counts(seqs: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab_size] float counts of each token id in each sequence.

    Ids outside the vocabulary (multimodal pad ids) are not tokens and are not counted.
    """
    seqs = [[t for t in seq if 0 <= t < vocab_size] for seq in seqs]
    row_ids = [row for row, seq in enumerate(seqs) for _ in seq]
    flat = to_device(row_ids, torch.long, device) * vocab_size
    flat += to_device(list(chain.from_iterable(seqs)), torch.long, device)
    counts = torch.zeros(len(seqs) * vocab_size, device=device)
    # index_add_ rather than bincount, which syncs with the host on CUDA to size its output.
    counts.index_add_(0, flat, torch.ones(flat.shape, device=device))
    return counts.view(len(seqs), vocab_size)


def _sample_mixed(logits: torch.Tensor, reqs: Sequence[SamplingReq]) -> torch.Tensor:
    device = logits.device
    params = [req.sampling_params for req in reqs]
    temperatures = _column([1.0 if p.is_greedy else p.temperature for p in params], logits.dtype, device)
    probs = _filter_logits(logits / temperatures, params).softmax(dim=-1)
    sampled = _draw(probs, [req.generator for req in reqs])
    greedy = [p.is_greedy for p in params]
    if not any(greedy):
        return sampled
    # An exact argmax (not a draw among tied maxima) keeps top_k=1 identical to greedy.
    return torch.where(to_device(greedy, torch.bool, device), logits.argmax(dim=-1), sampled)


def _filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set to -inf the logits outside each row's top-k, top-p nucleus and min-p band."""
    device, vocab_size = logits.device, logits.shape[-1]
    use_top_k = any(0 < p.top_k < vocab_size for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    if use_top_k or use_top_p:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        keep = torch.ones_like(sorted_logits, dtype=torch.bool)
        if use_top_k:
            top_ks = _column([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params], torch.long, device)
            keep &= torch.arange(vocab_size, device=device) < top_ks
        if use_top_p:
            top_ps = _column([p.top_p for p in params], logits.dtype, device)
            sorted_probs = sorted_logits.softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            keep &= (mass_before < top_ps) | (top_ps >= 1.0)
        # Both conditions keep a prefix of the sorted row, so a per-row threshold suffices.
        num_kept = keep.sum(dim=-1, keepdim=True)
        threshold = sorted_logits.gather(1, num_kept - 1)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
        min_ps = _column([p.min_p for p in params], logits.dtype, device)
        threshold = logits.max(dim=-1, keepdim=True).values + min_ps.log()
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    # The CPU kernel can return an exact 0, and 0/0 would make argmax pick a masked token.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _pending_output(
    raw_logits: torch.Tensor, next_ids: torch.Tensor, reqs: Sequence[SamplingReq]
) -> PendingSample:
    top_nums = [req.top_logprobs_num for req in reqs]
    max_top = max(top_nums, default=0)
    if not max_top and not any(req.return_logprob for req in reqs):
        return PendingSample(next_ids, None, None, top_nums)
    logprobs = raw_logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, next_ids.view(-1, 1)).view(-1)
    top = logprobs.topk(max_top, dim=-1) if max_top else None
    return PendingSample(next_ids, chosen, (top.indices, top.values) if top else None, top_nums)


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(values, dtype, device).view(-1, 1)

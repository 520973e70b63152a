"""SamplingParams validation and the batched Sampler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from cubeserve.engine.sampler import Sampler, adjust_logits, make_generator
from cubeserve.engine.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB = 64


@dataclass
class FakeReq:
    sampling_params: SamplingParams
    origin_input_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0


def params(**kwargs) -> SamplingParams:
    return SamplingParams(**kwargs).normalize()


def random_logits(batch: int, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, VOCAB, generator=generator).to(device)


# --- SamplingParams -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("max_new_tokens", 0),
        ("max_new_tokens", 1.5),
        ("n", 0),
        ("seed", "7"),
        ("stop", [""]),
        ("stop", 3),
        ("stop_token_ids", [VOCAB]),
        ("stop_token_ids", 5),
        ("logit_bias", {VOCAB: 1.0}),
        ("logit_bias", {1: 200.0}),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_params_name_the_field(field_name: str, value: object) -> None:
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**{field_name: value}).verify(VOCAB)


def test_negative_temperature_message() -> None:
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1).verify(VOCAB)


def test_defaults_verify() -> None:
    SamplingParams().verify(VOCAB)
    SamplingParams(stop="x", stop_token_ids=[1], logit_bias={3: -100}, seed=1).normalize().verify(VOCAB)


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams.from_dict({"temperature": 0.5, "max_tokens": 3})
    assert SamplingParams.from_dict({"top_k": 5}).top_k == 5


def test_normalize() -> None:
    p = SamplingParams(stop="END", temperature=0.0, logit_bias={"5": 1.0}).normalize()
    assert p.stop == ["END"]
    assert p.is_greedy and p.top_k == 1
    assert p.logit_bias == {5: 1.0}
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"a": 1.0}).normalize()
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=3).normalize()


# --- Sampler ------------------------------------------------------------------------------


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    a, b = make_generator(3, "cpu"), make_generator(3, "cpu")
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_top_k_1_and_temperature_0_agree(device: str) -> None:
    logits = random_logits(4, device)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1.0  # a tie: greedy takes the first index
    expected = logits.argmax(dim=-1).tolist()
    assert expected[0] == 5
    sampler = Sampler()
    greedy = sampler.sample(logits, [FakeReq(params(temperature=0.0)) for _ in range(4)])
    assert greedy.next_token_ids == expected
    # top_k=1 inside a batch that also samples must still be the exact argmax.
    mixed = [FakeReq(params(top_k=1, temperature=0.8)), FakeReq(params(temperature=1.0))] * 2
    for _ in range(5):
        out = sampler.sample(logits, mixed).next_token_ids
        assert out[0] == expected[0] and out[2] == expected[2]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_ignores_batch_composition(device: str) -> None:
    logits = random_logits(1, device, seed=1)
    sampler = Sampler()

    def run(batch_of: Callable[[FakeReq, int], tuple[list[FakeReq], int]], steps: int = 12) -> list[int]:
        seeded = FakeReq(params(temperature=1.2, top_p=0.95, seed=11), generator=make_generator(11, device))
        tokens = []
        for step in range(steps):
            reqs, row = batch_of(seeded, step)
            batch_logits = torch.cat(
                [logits if i == row else random_logits(1, device, seed=100 + i) for i in range(len(reqs))]
            )
            tokens.append(sampler.sample(batch_logits, reqs).next_token_ids[row])
        return tokens

    alone = run(lambda req, step: ([req], 0))
    others = [
        FakeReq(params(temperature=0.0)),
        FakeReq(params(top_k=5)),
        FakeReq(params(min_p=0.1, seed=3), generator=make_generator(3, device)),
    ]
    crowded = run(lambda req, step: (others[: step % 3] + [req] + others[step % 3 :], step % 3))
    assert alone == crowded
    assert len(set(alone)) > 1  # actually sampling, not greedy


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_differ(device: str) -> None:
    logits = torch.zeros(1, VOCAB, device=device)
    sampler = Sampler()

    def draws(seed: int) -> list[int]:
        req = FakeReq(params(seed=seed), generator=make_generator(seed, device))
        return [sampler.sample(logits, [req]).next_token_ids[0] for _ in range(8)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_hand_computation(device: str) -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]], device=device)
    original = logits.clone()
    penalized = FakeReq(
        params(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        origin_input_ids=[0],
        output_ids=[1, 1, 3],
    )
    untouched = FakeReq(params(), origin_input_ids=[0, 1, 2, 3], output_ids=[3])
    out = adjust_logits(logits, [penalized, untouched])
    # token 0: prompt only, positive -> 2 / 2.
    # token 1: seen, negative -> -1 * 2, then 2 outputs -> - 2 * 0.5 - 0.25.
    # token 2: unseen.  token 3: seen, positive -> 3 / 2, then 1 output -> - 0.5 - 0.25.
    expected = torch.tensor([1.0, -3.25, 0.5, 0.75], device=device)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], original[1])
    torch.testing.assert_close(logits, original)  # the input is not modified


@pytest.mark.parametrize("device", DEVICES)
def test_presence_only_and_logit_bias(device: str) -> None:
    logits = torch.zeros(1, 4, device=device)
    req = FakeReq(params(presence_penalty=1.0, logit_bias={2: 5.0, 0: -1.0}), origin_input_ids=[3], output_ids=[1, 1])
    out = adjust_logits(logits, [req])
    torch.testing.assert_close(out[0], torch.tensor([-1.0, -1.0, 5.0, 0.0], device=device))
    assert adjust_logits(logits, [FakeReq(params())]) is logits


# probs 0.5 / 0.3 / 0.15 / 0.05
FILTER_LOGITS = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("options", "expected_probs"),
    [
        ({"top_p": 0.7}, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # mass before token 2 is 0.8 >= 0.7
        ({"top_k": 2}, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
        ({"min_p": 0.25}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # keeps p >= 0.125
        ({"top_p": 0.9, "min_p": 0.5}, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # intersection
        ({}, [0.5, 0.3, 0.15, 0.05]),
    ],
)
def test_filters_and_sampled_distribution(device: str, options: dict, expected_probs: list[float]) -> None:
    num_draws = 4000
    logits = FILTER_LOGITS.to(device).expand(num_draws, -1).contiguous()
    out = Sampler().sample(logits, [FakeReq(params(**options))] * num_draws).next_token_ids
    freqs = torch.bincount(torch.tensor(out), minlength=4).float() / num_draws
    for token, p in enumerate(expected_probs):
        if p == 0.0:
            assert freqs[token] == 0.0, f"token {token} should be masked"
        else:
            assert abs(freqs[token] - p) < 0.04, (token, freqs.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_sharpens(device: str) -> None:
    logits = FILTER_LOGITS.to(device).expand(2000, -1).contiguous()
    out = Sampler().sample(logits, [FakeReq(params(temperature=0.1))] * 2000).next_token_ids
    assert out.count(0) > 1950  # 0.5 vs 0.3 at T=0.1: odds about 165 to 1


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax(device: str) -> None:
    logits = random_logits(3, device)
    reqs = [
        FakeReq(
            params(temperature=0.0, repetition_penalty=1.5), output_ids=[1], return_logprob=True, top_logprobs_num=3
        ),
        FakeReq(params(temperature=0.5), return_logprob=True),
        FakeReq(params(), return_logprob=True, top_logprobs_num=1),
    ]
    out = Sampler().sample(logits, reqs)
    raw = logits.log_softmax(dim=-1).cpu()
    for row, token in enumerate(out.next_token_ids):
        assert out.logprobs[row] == pytest.approx(raw[row, token].item(), abs=1e-5)
    assert [len(top) for top in out.top_logprobs] == [3, 0, 1]
    best_ids = raw[0].topk(3).indices.tolist()
    assert [token for token, _ in out.top_logprobs[0]] == best_ids
    assert out.top_logprobs[0][0][1] == pytest.approx(raw[0].max().item(), abs=1e-5)


def test_no_logprobs_unless_asked() -> None:
    out = Sampler().sample(random_logits(2, "cpu"), [FakeReq(params()), FakeReq(params(temperature=0.0))])
    assert out.logprobs is None and out.top_logprobs is None
    assert all(0 <= t < VOCAB for t in out.next_token_ids)

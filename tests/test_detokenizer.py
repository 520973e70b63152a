"""Incremental detokenization, stop strings and the scheduler's tail stop check."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cubeserve.demo import DEMO_CORPUS
from cubeserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher, tail_contains_stop

TEXTS = [
    "Hello world, the quick brown fox.",
    "naïve café — 世界 你好 🙂 emoji 👩‍👩‍👧 done",
    "<|im_start|>assistant\nSure! 42 apples<|im_end|> trailing",
    "Ünïcödé  spaces\n\nand\ttabs",
]


@pytest.fixture(scope="module")
def metaspace_bpe() -> PreTrainedTokenizerBase:
    """SentencePiece-style: a window's first token loses its leading space when decoded alone."""
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>", *byte_tokens], show_progress=False)
    bpe.train_from_iterator(DEMO_CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    deltas, pos = [], 0
    while pos < len(ids):
        step = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.step(ids[pos : pos + step]))
        pos += step
    return deltas


@pytest.mark.parametrize("tokenizer_name", ["demo_tokenizer", "metaspace_bpe"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(
    request: pytest.FixtureRequest, tokenizer_name: str, skip_special_tokens: bool, text: str
) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    for seed in range(3):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        deltas = stream(detok, ids, random.Random(seed))
        assert all("\ufffd" not in delta for delta in deltas)
        assert "".join(deltas) + detok.flush() == full


def test_multibyte_characters_are_held_until_complete(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = demo_tokenizer.encode("a世", add_special_tokens=False)
    assert len(ids) >= 3  # "世" is three byte tokens in the tiny vocabulary
    detok = IncrementalDetokenizer(demo_tokenizer)
    deltas = [detok.step([token]) for token in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == "世"


def test_flush_releases_an_incomplete_character(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = demo_tokenizer.encode("ok 世", add_special_tokens=False)[:-1]  # cut inside the character
    detok = IncrementalDetokenizer(demo_tokenizer)
    streamed = detok.step(ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == demo_tokenizer.decode(ids)


def test_prompt_tail_gives_the_first_token_its_context(metaspace_bpe: PreTrainedTokenizerBase) -> None:
    prompt = metaspace_bpe.encode("The quick brown", add_special_tokens=False)
    output = metaspace_bpe.encode("The quick brown fox jumps", add_special_tokens=False)[len(prompt) :]
    whole = metaspace_bpe.decode(prompt + output)
    detok = IncrementalDetokenizer(metaspace_bpe, prompt_ids_tail=prompt[-3:])
    text = "".join(detok.step([token]) for token in output) + detok.flush()
    assert text == whole[len(metaspace_bpe.decode(prompt)) :]
    assert text.startswith(" ")


# --- stop strings -------------------------------------------------------------------------


def run_matcher(stops: list[str], deltas: list[str]) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stops)
    emitted = []
    for delta in deltas:
        text, matched = matcher.feed(delta)
        emitted.append(text)
        if matched is not None:
            return emitted, matched
    emitted.append(matcher.flush())
    return emitted, None


def test_stop_string_cut_exactly_and_never_leaked() -> None:
    text = "Hello STO world STOP after"
    emitted, matched = run_matcher(["STOP"], list(text))
    assert matched == "STOP"
    assert "".join(emitted) == "Hello STO world "
    # Never emit text beyond the eventual answer, not even the first characters of "STOP".
    so_far = ""
    for chunk in emitted:
        so_far += chunk
        assert "Hello STO world ".startswith(so_far)


def test_earliest_stop_wins_and_later_feeds_are_empty() -> None:
    matcher = StopStringMatcher(["world", "o wo"])
    assert matcher.feed("Hello w") == ("Hell", None)
    assert matcher.feed("orld") == ("", "o wo")
    assert matcher.matched == "o wo"
    assert matcher.feed("more") == ("", None)


def test_held_back_prefix_is_flushed_without_a_match() -> None:
    emitted, matched = run_matcher(["STOP"], ["abc S", "T"])
    assert matched is None
    assert emitted == ["abc ", "", "ST"]


@pytest.mark.parametrize("seed", range(20))
def test_stop_matching_is_independent_of_delta_boundaries(seed: int) -> None:
    rng = random.Random(seed)
    stops = ["</s>", "\n\n", "END"]
    text = "".join(rng.choice(["a", "b", "<", "/", "s", ">", "\n", "E", "N", "D", " "]) for _ in range(60))
    cuts = sorted(rng.sample(range(1, len(text)), 10))
    deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    emitted, matched = run_matcher(stops, deltas)
    hits = [(text.find(stop), stop) for stop in stops if stop in text]
    if hits:
        start, stop = min(hits)
        assert matched == stop
        assert "".join(emitted) == text[:start]
    else:
        assert matched is None
        assert "".join(emitted) == text


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(["ok", ""])


def test_tail_contains_stop(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = demo_tokenizer.encode("the answer is 42. 世界", add_special_tokens=False)
    assert tail_contains_stop(demo_tokenizer, ids, ["42."], max_stop_len=3) == "42."
    later = ids + demo_tokenizer.encode(" and" * 20, add_special_tokens=False)
    assert tail_contains_stop(demo_tokenizer, later, ["42."], max_stop_len=3) is None  # no longer in the tail
    assert tail_contains_stop(demo_tokenizer, ids, ["世界", "nope"], max_stop_len=4) == "世界"
    assert tail_contains_stop(demo_tokenizer, ids, ["is 42", "42. 世"], max_stop_len=20) == "is 42"
    assert tail_contains_stop(demo_tokenizer, ids, [], max_stop_len=0) is None
    assert tail_contains_stop(demo_tokenizer, [], ["x"], max_stop_len=1) is None

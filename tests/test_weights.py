"""Checkpoint loading (safetensors, sharded, dummy), load errors and the model registry."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from model_factory import PagedHarness, load_cubeserve_model, make_tiny_checkpoint, tiny_config
from safetensors.torch import load_file, save_file
from torch import nn

import cubeserve.models
from cubeserve.models.llama import LlamaForCausalLM
from cubeserve.models.qwen2 import Qwen2ForCausalLM
from cubeserve.models.qwen3 import Qwen3ForCausalLM
from cubeserve.models.registry import ModelRegistry, _ModelRegistry
from cubeserve.models.weights import (
    SAFETENSORS_INDEX,
    WeightLoadError,
    load_model,
    safetensors_weights_iterator,
)


def _edit_single_file_checkpoint(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_sharded_and_single_file_checkpoints_load_identical_params(tmp_path):
    single = make_tiny_checkpoint(tmp_path / "single", "qwen3", seed=3)
    sharded = make_tiny_checkpoint(tmp_path / "sharded", "qwen3", seed=3, sharded=True)
    assert (sharded / SAFETENSORS_INDEX).exists() and len(list(sharded.glob("*.safetensors"))) > 1

    single_params = dict(load_cubeserve_model(single).named_parameters())
    sharded_params = dict(load_cubeserve_model(sharded).named_parameters())

    assert single_params.keys() == sharded_params.keys()
    for name, param in single_params.items():
        assert torch.equal(param, sharded_params[name]), name


def test_iterator_streams_every_tensor_of_every_shard(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama", sharded=True)
    expected = {
        name: tensor
        for file in path.glob("*.safetensors")
        for name, tensor in load_file(file).items()
    }

    streamed = dict(safetensors_weights_iterator(path, progress=False))

    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[name], expected[name]) for name in expected)


def test_missing_tensor_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen2")
    _edit_single_file_checkpoint(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))

    with pytest.raises(
        WeightLoadError, match=r"missing tensors \['model\.layers\.1\.self_attn\.k_proj\.weight'\]"
    ):
        load_cubeserve_model(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama")
    _edit_single_file_checkpoint(
        path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    )

    with pytest.raises(
        WeightLoadError, match=r"unexpected tensors \['model\.layers\.0\.mlp\.extra\.weight'\]"
    ):
        load_cubeserve_model(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen2")
    _edit_single_file_checkpoint(path, lambda t: t.update({"model.norm.weight": torch.ones(3)}))

    with pytest.raises(WeightLoadError, match=r"model\.norm\.weight.*shape mismatch"):
        load_cubeserve_model(path)


def test_tied_checkpoint_may_carry_lm_head_and_rotary_inv_freq(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)

    def add_redundant_tensors(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _edit_single_file_checkpoint(path, add_redundant_tensors)
    model = load_cubeserve_model(path)

    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_qkv_and_gate_up_shards_land_in_their_slices(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen2")
    tensors = load_file(path / "model.safetensors")
    layer = load_cubeserve_model(path).model.layers[0]

    qkv = layer.self_attn.qkv_proj
    q, k, v = qkv.weight.split([4 * 16, 2 * 16, 2 * 16])  # 4 query heads, 2 KV heads, head_dim 16
    prefix = "model.layers.0.self_attn"
    assert torch.equal(q, tensors[f"{prefix}.q_proj.weight"])
    assert torch.equal(k, tensors[f"{prefix}.k_proj.weight"])
    assert torch.equal(v, tensors[f"{prefix}.v_proj.weight"])
    assert torch.equal(qkv.bias, torch.cat([tensors[f"{prefix}.{p}_proj.bias"] for p in "qkv"]))
    gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, tensors["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(up, tensors["model.layers.0.mlp.up_proj.weight"])


def test_load_model_builds_in_requested_dtype_in_eval_mode(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama")
    default_dtype = torch.get_default_dtype()

    model = load_cubeserve_model(path, dtype=torch.bfloat16)

    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert torch.get_default_dtype() == default_dtype


def test_dummy_load_needs_no_files_and_gives_finite_logits():
    config = tiny_config("qwen3", vocab_size=1000)

    model = load_model(Qwen3ForCausalLM, config, None, torch.float32, "cpu", load_format="dummy")

    assert all(p.abs().max() <= 1e-3 and p.abs().max() > 0 for p in model.parameters())
    harness = PagedHarness(model)
    logits = harness.extend([harness.add_request()], [[1, 2, 3]])
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_unknown_load_format_is_rejected():
    with pytest.raises(ValueError, match="load_format"):
        load_model(
            Qwen2ForCausalLM, tiny_config("qwen2"), None, torch.float32, "cpu", load_format="pt"
        )


def test_registry_discovers_built_in_architectures():
    assert ModelRegistry.resolve(["Qwen2ForCausalLM"]) is Qwen2ForCausalLM
    assert ModelRegistry.resolve(["UnknownArch", "LlamaForCausalLM"]) is LlamaForCausalLM
    assert ModelRegistry.resolve(["Qwen3ForCausalLM"]) is Qwen3ForCausalLM


def test_registry_resolves_externally_registered_class():
    class MyArch(nn.Module):
        pass

    registry = _ModelRegistry()
    registry.register("MyArch", MyArch)

    assert registry.resolve(["MyArch"]) is MyArch
    assert "MyArch" in registry.supported_architectures()


def test_unknown_architecture_error_lists_supported_names():
    with pytest.raises(
        ValueError, match=r"not supported.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"
    ):
        ModelRegistry.resolve(["GPTNeoForCausalLM"])


@pytest.fixture
def extra_models_dir(tmp_path, monkeypatch):
    """Two more modules in cubeserve.models: one that fails to import, one with two entries."""
    (tmp_path / "broken_test_model.py").write_text("import not_a_real_package\n")
    (tmp_path / "extra_test_model.py").write_text(
        "from torch import nn\n"
        "class A(nn.Module): pass\n"
        "class B(nn.Module): pass\n"
        "EntryClass = [A, B]\n"
    )
    monkeypatch.setattr(cubeserve.models, "__path__", [*cubeserve.models.__path__, str(tmp_path)])
    yield tmp_path
    sys.modules.pop("cubeserve.models.extra_test_model", None)


def test_module_that_fails_to_import_is_reported_not_hidden(extra_models_dir, caplog):
    registry = _ModelRegistry()

    with caplog.at_level(logging.WARNING, logger="cubeserve.models.registry"):
        assert registry.resolve(["B"]).__name__ == "B"

    assert (
        "cubeserve.models.broken_test_model" in caplog.text and "not_a_real_package" in caplog.text
    )
    with pytest.raises(ValueError, match="broken_test_model.*not_a_real_package"):
        registry.resolve(["Broken"])

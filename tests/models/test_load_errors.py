"""Bad model folders fail at load time with a ValueError that names the culprit: the file
(config.json, a shard) or the checkpoint tensor / parameter (issue 6, "Bad input")."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda import EngineArgs
from pagoda.model_loader.loader import get_model
from tests.utils import make_model, tiny_llama_config

WEIGHTS = "model.safetensors"


def _tiny_moe_config():
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                          moe_intermediate_size=16, num_experts=3, num_experts_per_tok=2,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, architectures=["Qwen3MoeForCausalLM"])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_model(path, tiny_llama_config(vocab_size=64, num_hidden_layers=1), tokenizer=False)
    return path


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("moe"))
    make_model(path, _tiny_moe_config(), tokenizer=False)
    return path


@pytest.fixture
def copy_of(tmp_path):
    def copy(src: str) -> str:
        dst = str(tmp_path / "model")
        shutil.copytree(src, dst)
        return dst
    return copy


def _load(path: str):
    config = EngineArgs(model=path, dtype="float32").create_engine_config()
    return get_model(config.model_config, torch.device("cpu"))


def _edit_tensors(path: str, edit) -> None:
    file = os.path.join(path, WEIGHTS)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_the_good_folders_load(llama_dir, moe_dir):
    _load(llama_dir)
    _load(moe_dir)


def test_malformed_config_json(llama_dir, copy_of):
    path = copy_of(llama_dir)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match="config.json"):
        _load(path)


def test_missing_config_json(llama_dir, copy_of):
    path = copy_of(llama_dir)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ValueError, match="no config.json"):
        _load(path)


@pytest.mark.parametrize("archs, message", [
    (["TotallyNewForCausalLM"], "'TotallyNewForCausalLM' is not supported; supported: .*GPT2"),
    ([], "names no architecture"),
])
def test_unsupported_or_missing_architecture(llama_dir, copy_of, archs, message):
    path = copy_of(llama_dir)
    config_file = os.path.join(path, "config.json")
    config = json.loads(open(config_file).read())
    config["architectures"] = archs
    with open(config_file, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=message):
        _load(path)


def test_missing_shard(llama_dir, tmp_path):
    path = str(tmp_path / "sharded")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.save_pretrained(path, max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) > 1
    _load(path)  # complete, it loads
    os.remove(os.path.join(path, shards[-1]))
    with pytest.raises(ValueError, match=f"names shard {shards[-1]}, which is missing"):
        _load(path)


def test_no_weight_files(llama_dir, copy_of):
    path = copy_of(llama_dir)
    os.remove(os.path.join(path, WEIGHTS))
    with pytest.raises(ValueError, match="no weights"):
        _load(path)


def test_truncated_weight_file(llama_dir, copy_of):
    path = copy_of(llama_dir)
    file = os.path.join(path, WEIGHTS)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(ValueError, match=f"cannot read .*{WEIGHTS}"):
        _load(path)


def test_tensor_of_the_wrong_shape(llama_dir, copy_of):
    path = copy_of(llama_dir)
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(path, lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(ValueError, match=f"{WEIGHTS}.*'{name}'.*shape"):
        _load(path)


def test_missing_tensor_names_the_parameter(llama_dir, copy_of):
    path = copy_of(llama_dir)
    _edit_tensors(path, lambda t: t.pop("model.layers.0.post_attention_layernorm.weight"))
    with pytest.raises(ValueError, match="no checkpoint tensor.*post_attention_layernorm"):
        _load(path)


def test_unexpected_tensor(llama_dir, copy_of):
    path = copy_of(llama_dir)
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.0.surprise.weight",
                                                torch.zeros(2)))
    with pytest.raises(ValueError, match="'model.layers.0.surprise.weight' matches no param"):
        _load(path)


def test_missing_expert(moe_dir, copy_of):
    path = copy_of(moe_dir)
    _edit_tensors(path, lambda t: t.pop("model.layers.0.mlp.experts.1.up_proj.weight"))
    with pytest.raises(ValueError, match=r"expert 1 \(up\)"):
        _load(path)


@pytest.mark.parametrize("name, bad", [
    ("model.layers.0.mlp.experts.2.down_proj.weight", lambda w: w[:, :-1].contiguous()),
    ("model.layers.0.mlp.experts.7.gate_proj.weight", None),  # no such expert
])
def test_bad_expert_tensor(moe_dir, copy_of, name, bad):
    path = copy_of(moe_dir)

    def edit(tensors):
        source = tensors["model.layers.0.mlp.experts.0.gate_proj.weight"]
        tensors[name] = bad(tensors[name]) if bad else source.clone()

    _edit_tensors(path, edit)
    with pytest.raises(ValueError, match=f"'{name}'"):
        _load(path)


def test_fused_qkv_of_the_wrong_shape(tmp_path):
    from transformers import GPTNeoXConfig
    path = str(tmp_path / "neox")
    make_model(path, GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   architectures=["GPTNeoXForCausalLM"]), tokenizer=False)
    _load(path)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    _edit_tensors(path, lambda t: t.__setitem__(name, t[name][:-2].contiguous()))
    with pytest.raises(ValueError, match=f"'{name}'.*rows"):
        _load(path)

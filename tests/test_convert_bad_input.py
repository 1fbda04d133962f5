"""Bad inputs and requests: one clear error naming the culprit, before anything is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from megatron_dil.convert import ConversionError, hf_to_megatron, megatron_to_hf
from tests.test_convert_models import build_hf_models


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return build_hf_models(tmp_path_factory.mktemp("hf"))


def edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def assert_refused(source: Path, out: Path, match: str, **kwargs) -> None:
    kwargs = {"tensor_parallel": 1, "pipeline_parallel": 1, "progress": False, **kwargs}
    with pytest.raises(ConversionError, match=match):
        hf_to_megatron(source, out, **kwargs)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_bad_hf_inputs_are_refused_before_writing(hf_models, tmp_path):
    llama, qwen = hf_models["llama"][0], hf_models["qwen2"][0]
    out = tmp_path / "out"
    gpt = edited_copy(qwen, tmp_path / "gpt", architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    assert_refused(gpt, out, r"architectures=\['GPTNeoXForCausalLM'\] is not supported")
    missing = tmp_path / "missing_shard"
    shutil.copytree(llama, missing)
    victim = sorted(missing.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert_refused(missing, out, f"lists {victim.name} .* which does not exist")
    assert_refused(llama, out, r"dtype='int8' is not supported", dtype="int8")
    assert_refused(llama, out, r"tensor_parallel=3 does not divide num_attention_heads=4", tensor_parallel=3)
    assert_refused(llama, out, r"tensor_parallel=4 does not divide num_query_groups=2", tensor_parallel=4)
    assert_refused(llama, out, r"pipeline_parallel=3 does not divide num_layers=4", pipeline_parallel=3)
    wider = edited_copy(qwen, tmp_path / "wider", intermediate_size=128)
    assert_refused(wider, out, r"model.layers.0.mlp.gate_proj.weight has shape \[96, 64\] but config.json implies "
                               r"\[128, 64\]")
    rope = json.loads((llama / "config.json").read_text())["rope_parameters"]
    high = edited_copy(llama, tmp_path / "high", rope_parameters={**rope, "high_freq_factor": 2.0})
    assert_refused(high, out, r"high_freq_factor=2.0 is not supported")
    yarn = edited_copy(llama, tmp_path / "yarn", rope_parameters={**rope, "rope_type": "yarn"})
    assert_refused(yarn, out, r"rope scaling type 'yarn' is not supported")
    biased = edited_copy(llama, tmp_path / "biased", attention_bias=True)
    assert_refused(biased, out, r"attention_bias=True is not supported")
    assert_refused(tmp_path / "nowhere", out, r"config.json does not exist")
    out.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_megatron(llama, out, tensor_parallel=1, pipeline_parallel=1, progress=False)


def test_megatron_checkpoint_disagreeing_with_its_config_is_refused(hf_models, tmp_path):
    ckpt = tmp_path / "ckpt"
    hf_to_megatron(hf_models["mistral"][0], ckpt, tensor_parallel=2, pipeline_parallel=1, progress=False)
    config = yaml.safe_load((ckpt / "model_config.yaml").read_text())
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump({**config, "ffn_hidden_size": 128}))
    match = (r"tp00_pp000.safetensors: decoder.layers.0.mlp.linear_fc1.weight has shape \[96, 64\] but "
             r"model_config.yaml implies \[128, 64\] at tensor_parallel=2")
    for convert in (lambda out: megatron_to_hf(ckpt, out, progress=False),
                    lambda out: hf_to_megatron(ckpt, out, tensor_parallel=1, pipeline_parallel=1, progress=False)):
        with pytest.raises(ConversionError, match=match):
            convert(tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(config))
    (ckpt / "shards" / "tp01_pp000.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"tp01_pp000.safetensors is listed in .* but missing"):
        megatron_to_hf(ckpt, tmp_path / "out", progress=False)

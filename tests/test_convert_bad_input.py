"""Bad inputs and requests: one clear error naming the culprit, before anything is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from megatron_dil.convert import ConversionError, hf_to_megatron, megatron_to_hf
from megatron_dil.convert.checkpoint import MANIFEST_NAME
from megatron_dil.io import IntegrityError, file_record
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


def rerecord(checkpoint: Path, name: str) -> None:
    """Update the manifest's size/digest record of ``name`` after editing it."""
    manifest_path = checkpoint / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = file_record(checkpoint / name)
    manifest_path.write_text(json.dumps(manifest))


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
    rerecord(ckpt, "model_config.yaml")  # consistent records, inconsistent content: the shape check must catch it
    match = (r"tp00_pp000.safetensors: decoder.layers.0.mlp.linear_fc1.weight has shape \[96, 64\] but "
             r"model_config.yaml implies \[128, 64\] at tensor_parallel=2")
    for convert in (lambda out: megatron_to_hf(ckpt, out, progress=False),
                    lambda out: hf_to_megatron(ckpt, out, tensor_parallel=1, pipeline_parallel=1, progress=False)):
        with pytest.raises(ConversionError, match=match):
            convert(tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(config))
    rerecord(ckpt, "model_config.yaml")
    (ckpt / "shards" / "tp01_pp000.safetensors").unlink()
    with pytest.raises(IntegrityError, match=r"tp01_pp000.safetensors is missing; re-convert it"):
        megatron_to_hf(ckpt, tmp_path / "out", progress=False)


def test_damaged_files_are_one_line_naming_the_file(hf_models, tmp_path, capfd):
    """Truncated or corrupted weights (HF side and ours), incomplete configs and manifests: a ConversionError /
    IntegrityError naming the file and the problem, nothing written; as init.checkpoint, one line from the CLI."""
    llama, qwen = hf_models["llama"][0], hf_models["qwen2"][0]
    out = tmp_path / "out"
    truncated = edited_copy(llama, tmp_path / "truncated")
    victim = sorted(truncated.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    assert_refused(truncated, out, f"{victim} is not a readable safetensors file .*incomplete metadata")
    text = edited_copy(qwen, tmp_path / "text")
    (text / "model.safetensors").write_text("not weights")
    assert_refused(text, out, f"{text / 'model.safetensors'} is not a readable safetensors file")
    for field in ("num_hidden_layers", "hidden_size"):
        missing = edited_copy(qwen, tmp_path / f"no_{field}", **{field: None})
        assert_refused(missing, out, f"{missing / 'config.json'} has no {field}")
    fractional = edited_copy(qwen, tmp_path / "fractional", num_hidden_layers=2.5)
    assert_refused(fractional, out, r"config.json num_hidden_layers=2.5 is not a positive integer")

    ckpt = tmp_path / "ckpt"
    hf_to_megatron(llama, ckpt, tensor_parallel=1, pipeline_parallel=1, progress=False)
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    shard = "shards/tp00_pp000.safetensors"
    assert manifest["format_version"] == 2 and manifest["files"][shard] == file_record(ckpt / shard)
    assert set(manifest["files"]) >= {shard, "model_config.yaml", "hf_config.json", "tokenizer/tokenizer.json"}

    def damaged(name: str, damage) -> Path:
        copy = tmp_path / name
        shutil.copytree(ckpt, copy)
        damage(copy)
        return copy

    def refused(source: Path, error: type, match: str) -> None:
        for convert in (lambda o: megatron_to_hf(source, o, progress=False),
                        lambda o: hf_to_megatron(source, o, tensor_parallel=1, pipeline_parallel=1, progress=False)):
            with pytest.raises(error, match=match) as info:
                convert(out)
            assert "\n" not in str(info.value)
            assert not out.exists() and not out.with_name(out.name + ".partial").exists()

    def truncate(copy: Path) -> None:
        path = copy / shard
        path.write_bytes(path.read_bytes()[:-1000])

    def flip(copy: Path) -> None:  # same size, one byte of tensor data changed
        data = bytearray((copy / shard).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / shard).write_bytes(bytes(data))

    def drop_key(copy: Path) -> None:
        (copy / MANIFEST_NAME).write_text(json.dumps({k: v for k, v in manifest.items() if k != "dtype"}))

    short = damaged("short", truncate)
    refused(short, IntegrityError, f"{short / shard} has \\d+ bytes but \\d+ were written .*re-convert it: "
                                   f"`megatron-dil-hf-to-megatron --source {llama.resolve()}")
    flipped = damaged("flipped", flip)
    refused(flipped, IntegrityError, f"{flipped / shard} does not match the checksum recorded")
    no_config = damaged("no_config", lambda c: (c / "model_config.yaml").unlink())
    refused(no_config, IntegrityError, f"{no_config / 'model_config.yaml'} is missing")
    no_key = damaged("no_key", drop_key)
    refused(no_key, ConversionError, f"{no_key / MANIFEST_NAME}: dtype: required key is missing")

    old = damaged("format1", lambda c: (c / MANIFEST_NAME).write_text(json.dumps(
        {**{k: v for k, v in manifest.items() if k != "files"}, "format_version": 1})))
    with pytest.warns(UserWarning, match=f"{old} is a format-1 megatron_dil checkpoint without file checksums"):
        megatron_to_hf(old, tmp_path / "old_hf", progress=False)  # accepted: older ones still load, with it
    old_short = damaged("format1_short", lambda c: (truncate(c), (c / MANIFEST_NAME).write_text(
        (old / MANIFEST_NAME).read_text())))
    with pytest.warns(UserWarning):
        refused(old_short, ConversionError, f"{old_short / shard} is not a readable safetensors file")

    from megatron_dil.train import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "init": {"checkpoint": str(short)},
                                      "data": {"train": ["unused"], "tokenizer": str(llama)}}))
    capfd.readouterr()
    assert main(["--config", str(config)]) == 1
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"IntegrityError: checkpoint: {short / shard} has" in lines[0], lines

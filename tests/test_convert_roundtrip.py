"""HF → Megatron (TP=2, PP=2) → HF is bit-exact (tensors and config.json); resharding and dtype casts; the CLIs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_dil.convert import hf_to_megatron, megatron_to_hf
from tests.test_convert_models import TOKENS, build_hf_models


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return build_hf_models(tmp_path_factory.mktemp("hf"))


def source_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory, read with the plain libraries (independent of the converter's reader)."""
    if (hf_dir / "pytorch_model.bin").is_file():
        return dict(torch.load(hf_dir / "pytorch_model.bin", weights_only=True))
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_hf_megatron_hf_is_bit_exact(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, (hf_dir, reference_logits) in hf_models.items():
        ckpt, exported = tmp_path / f"{name}_mg", tmp_path / f"{name}_hf"
        summary = hf_to_megatron(hf_dir, ckpt, tensor_parallel=2, pipeline_parallel=2, progress=False)
        assert summary.files == 4 and summary.padded_vocab_size == 256 and summary.vocab_size == 200
        megatron_to_hf(ckpt, exported, max_shard_bytes=64 * 1024, progress=False)  # forces a sharded export
        assert (exported / "model.safetensors.index.json").is_file()
        original, roundtrip = source_tensors(hf_dir), source_tensors(exported)
        if name == "qwen2":  # tied: the .bin-style duplicate is never exported
            original.pop("lm_head.weight", None)
        assert original.keys() == roundtrip.keys(), name
        for key, tensor in original.items():
            assert roundtrip[key].dtype == tensor.dtype and torch.equal(roundtrip[key], tensor), f"{name}: {key}"
        assert json.loads((exported / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.equal(model(TOKENS).logits, reference_logits), name
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama_hf")
    assert tokenizer.convert_tokens_to_ids(["t5", "t150"]) == [5, 150]
    assert not list(tmp_path.glob("*.partial"))


def test_reshard_megatron_to_megatron_equals_direct_conversion(hf_models, tmp_path):
    hf_dir = hf_models["llama"][0]
    hf_to_megatron(hf_dir, tmp_path / "tp2pp2", tensor_parallel=2, pipeline_parallel=2, progress=False)
    hf_to_megatron(tmp_path / "tp2pp2", tmp_path / "resharded", tensor_parallel=1, pipeline_parallel=4,
                   progress=False)
    hf_to_megatron(hf_dir, tmp_path / "direct", tensor_parallel=1, pipeline_parallel=4, progress=False)
    files = sorted(p.name for p in (tmp_path / "direct" / "shards").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resharded" / "shards").iterdir()) and len(files) == 4
    for name in files:
        direct, resharded = load_file(tmp_path / "direct/shards" / name), load_file(tmp_path / "resharded/shards" / name)
        assert direct.keys() == resharded.keys()
        assert all(torch.equal(direct[k], resharded[k]) for k in direct), name
    assert (tmp_path / "resharded" / "tokenizer" / "tokenizer.json").is_file()


def test_dtype_cast_and_shard_contents(hf_models, tmp_path):
    hf_dir = hf_models["qwen2"][0]
    hf_to_megatron(hf_dir, tmp_path / "bf16", tensor_parallel=2, pipeline_parallel=1, dtype="bfloat16",
                   progress=False)
    manifest = json.loads((tmp_path / "bf16" / "megatron_dil_checkpoint.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["tensor_parallel"] == 2
    original = source_tensors(hf_dir)
    with safe_open(str(tmp_path / "bf16/shards/tp01_pp000.safetensors"), "pt") as f:
        assert "output_layer.weight" not in f.keys()  # tied: the output layer is the embedding
        embedding = f.get_tensor("embedding.word_embeddings.weight")
        qkv_bias = f.get_tensor("decoder.layers.1.self_attention.linear_qkv.bias")
    # rank 1 owns vocab rows [128, 256): 72 real rows then zero padding
    assert torch.equal(embedding[:72], original["model.embed_tokens.weight"][128:].to(torch.bfloat16))
    assert embedding.dtype == torch.bfloat16 and not embedding[72:].any()
    # rank 1 owns query group 1: its 2 query heads, its key head, its value head (head dim 16)
    q, k, v = (original[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv")
    expected = torch.cat([q[32:64], k[16:32], v[16:32]]).to(torch.bfloat16)
    assert torch.equal(qkv_bias, expected)
    megatron_to_hf(tmp_path / "bf16", tmp_path / "f32", dtype="float32", progress=False)
    exported = source_tensors(tmp_path / "f32")
    for key, tensor in original.items():
        if key != "lm_head.weight":
            assert torch.equal(exported[key], tensor.to(torch.bfloat16).float()), key
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_command_line_tools(hf_models, tmp_path, capsys):
    from megatron_dil.convert.hf_to_megatron import main as to_megatron
    from megatron_dil.convert.megatron_to_hf import main as to_hf

    hf_dir = hf_models["mistral"][0]
    assert to_megatron(["--source", str(hf_dir), "--output", str(tmp_path / "mg"), "--tensor-parallel", "2",
                        "--no-progress"]) == 0
    assert "2 shard files (TP=2, PP=1)" in capsys.readouterr().out
    assert to_hf(["--source", str(tmp_path / "mg"), "--output", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert "tensors in 1 safetensors files" in capsys.readouterr().out
    assert to_megatron(["--source", str(hf_dir), "--output", str(tmp_path / "bad"), "--tensor-parallel", "3"]) == 1
    assert "tensor_parallel=3 does not divide num_attention_heads=4" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_export_without_hf_config_takes_token_ids_from_the_tokenizer(tmp_path):
    """A checkpoint without an HF config (a run started from a preset) exports bos/eos/pad ids from its tokenizer
    into config.json and generation_config.json, so a greedy transformers generate() stops at EOS. The weights are
    made to predict EOS at step k of the greedy continuation (lm_head rows of the k-th token and EOS swapped)."""
    import shutil

    import transformers

    from megatron_dil.convert.checkpoint import MANIFEST_NAME
    from megatron_dil.data.tiny_task import tiny_example_dir

    tokenizer_dir = Path(tiny_example_dir(), "tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    assert None not in ids.values() and len(set(ids.values())) == 3
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.tensor([[tok.bos_token_id, 10, 20, 30]])
    greedy = prompt
    with torch.no_grad():
        for _ in range(8):
            greedy = torch.cat([greedy, model(greedy).logits[:, -1:].argmax(-1)], dim=1)
    steps = greedy[0, prompt.shape[1]:].tolist()
    k = next(i for i in range(1, len(steps)) if steps[i] not in steps[:i] and ids["eos_token_id"] not in steps[:i + 1])
    with torch.no_grad():
        head = model.lm_head.weight
        head[[steps[k], ids["eos_token_id"]]] = head[[ids["eos_token_id"], steps[k]]].clone()
    model.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / "hf" / name)

    ckpt = tmp_path / "ckpt"
    hf_to_megatron(tmp_path / "hf", ckpt, tensor_parallel=1, pipeline_parallel=1, progress=False)
    (ckpt / "hf_config.json").unlink()  # as a preset run writes it: nothing to inherit the ids from
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    del manifest["files"]["hf_config.json"]
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    megatron_to_hf(ckpt, tmp_path / "export", progress=False)

    for name in ("config.json", "generation_config.json"):
        written = json.loads((tmp_path / "export" / name).read_text())
        assert {f: written.get(f) for f in ids} == ids, name
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    out = exported.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == steps[:k] + [ids["eos_token_id"]]

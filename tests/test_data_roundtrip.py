"""Round trip rows -> preprocess -> reader against independent tokenizations (HF and sentencepiece)."""
from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest

from megatron_dil.data import PreferenceDataset, PreprocessConfig, preprocess_pairs
from megatron_dil.data.preprocess import main
from megatron_dil.data.tiny_task import tiny_example_dir

TINY_TOKENIZER = os.path.join(tiny_example_dir(), "tokenizer")
WORDS = "hello world the answer is four forty question sort digits please tell me".split()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def run(tmp_path, rows, name="ds", **kw):
    kw.setdefault("tokenizer", TINY_TOKENIZER)
    config = PreprocessConfig(inputs=[write_jsonl(tmp_path / f"{name}.jsonl", rows)],
                              output_prefix=str(tmp_path / name), progress=False, **kw)
    return preprocess_pairs(config)


def pairs(prefix):
    ds = PreferenceDataset(prefix)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_hf_string_rows_match_independent_tokenization(tmp_path, hf):
    # string rows are joined as written (prompt + response), so the response carries its separator
    rows = [{"prompt": f"sort ascending : {i} 2 1", "chosen": f" 1 2 {i}", "rejected": f" {i} 2 1"}
            for i in range(3, 8)]
    result = run(tmp_path, rows, workers=2, chunk_size=2)
    assert result.counts["pairs_written"] == 5 and result.counts["boundary_shifted"] == 0
    for row, pair in zip(rows, pairs(result.prefixes["train"])):
        reference_prompt = hf(row["prompt"])["input_ids"]  # the tokenizer's own post-processor adds the BOS
        assert reference_prompt[0] == hf.bos_token_id and reference_prompt[1] != hf.bos_token_id
        assert pair.prompt.tolist() == reference_prompt
        for response, got in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            joint = hf(row["prompt"] + row[response])["input_ids"] + [hf.eos_token_id]
            assert np.concatenate([pair.prompt, got]).tolist() == joint


def test_hf_conversational_rows_use_chat_template_without_double_bos(tmp_path, hf):
    prompt = [{"role": "user", "content": "sort descending : 4 9 1"}]
    rows = [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "9 4 1"}],
         "rejected": [{"role": "assistant", "content": "1 4 9"}]},
        # UltraFeedback-binarized form: prompt string, chosen/rejected hold the whole conversation
        {"prompt": "sort descending : 4 9 1", "chosen": prompt + [{"role": "assistant", "content": "9 4 1"}],
         "rejected": prompt + [{"role": "assistant", "content": "4 9 1"}]},
    ]
    result = run(tmp_path, rows)
    got = pairs(result.prefixes["train"])
    reference_prompt = hf.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
    for row, pair in zip(rows, got):
        assert pair.prompt.tolist() == reference_prompt
        for key, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            conversation = prompt + [{"role": "assistant", "content": row[key][-1]["content"]}]
            reference = hf.apply_chat_template(conversation)["input_ids"]
            assert np.concatenate([pair.prompt, response]).tolist() == reference
            assert response[-1] == hf.eos_token_id
    # the trap: the template writes <s> and the tokenizer's post-processor adds another one
    text = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    naive = hf(text)["input_ids"]
    assert naive[:2] == [hf.bos_token_id, hf.bos_token_id]
    assert got[0].prompt[0] == hf.bos_token_id and got[0].prompt[1] != hf.bos_token_id
    meta = PreferenceDataset(result.prefixes["train"]).metadata
    assert meta["template"]["name"] == "tokenizer" and meta["tokenizer"]["vocab_size"] == len(hf)


def test_text_prompt_with_written_bos_is_not_doubled(tmp_path, hf):
    rows = [{"prompt": "<s> sort ascending : 2 1 3", "chosen": " 1 2 3", "rejected": " 3 2 1"}]
    pair = pairs(run(tmp_path, rows).prefixes["train"])[0]
    assert pair.prompt.tolist() == hf("sort ascending : 2 1 3")["input_ids"]


def test_sentencepiece_string_rows_and_boundary_shift(tmp_path, sp_model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    rows = [
        {"prompt": "tell me the answer is", "chosen": " four", "rejected": " forty"},
        # the prompt ends inside a word: "▁f" "o" alone, "▁four" jointly -> boundary shifts left by the merged token
        {"prompt": "tell me the answer is fo", "chosen": "ur", "rejected": "rty"},
    ]
    result = run(tmp_path, rows, tokenizer=sp_model)
    got = pairs(result.prefixes["train"])
    assert result.counts["boundary_shifted"] == 1
    for row, pair in zip(rows, got):
        prompt_alone = [sp.bos_id()] + sp.encode(row["prompt"])
        joints = {key: [sp.bos_id()] + sp.encode(row["prompt"] + row[key]) + [sp.eos_id()]
                  for key in ("chosen", "rejected")}
        for key, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            assert np.concatenate([pair.prompt, response]).tolist() == joints[key]
        boundary = min(next(i for i, (a, b) in enumerate(zip(prompt_alone + [-1], j)) if a != b)
                       for j in joints.values())
        assert pair.prompt.tolist() == prompt_alone[:boundary]
    assert got[0].prompt.tolist() == [sp.bos_id()] + sp.encode(rows[0]["prompt"])
    shifted_prompt = [sp.bos_id()] + sp.encode(rows[1]["prompt"])
    assert len(got[1].prompt) < len(shifted_prompt)  # the merged "o" belongs to the responses now
    assert sp.id_to_piece(int(got[1].chosen[0])) != sp.id_to_piece(shifted_prompt[len(got[1].prompt)])
    # separate tokenization would have produced a different sequence than the joint one
    assert shifted_prompt + sp.encode("ur") != [sp.bos_id()] + sp.encode(rows[1]["prompt"] + "ur")


def test_sentencepiece_conversational_named_template(tmp_path, sp_model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    rows = [{"prompt": [{"role": "user", "content": "tell me the answer"}],
             "chosen": [{"role": "assistant", "content": "four"}],
             "rejected": [{"role": "assistant", "content": "forty"}]}]
    result = run(tmp_path, rows, tokenizer=sp_model, template="plain")
    pair = pairs(result.prefixes["train"])[0]
    # plain template: <s> + prompt + response + </s>, the special strings mapped to their ids
    assert pair.prompt.tolist() == [sp.bos_id()] + sp.encode("tell me the answer")
    assert np.concatenate([pair.prompt, pair.chosen]).tolist() == \
        [sp.bos_id()] + sp.encode("tell me the answerfour") + [sp.eos_id()]


def test_truncation_keeps_prompt_end_and_bos(tmp_path, hf):
    digits = " ".join(str(i % 10) for i in range(20))
    rows = [{"prompt": f"sort ascending : {digits}", "chosen": " " + " ".join(["1"] * 30),
             "rejected": " " + " ".join(["2"] * 5)}]
    result = run(tmp_path, rows, max_length=24, max_prompt_length=10)
    pair = pairs(result.prefixes["train"])[0]
    full_prompt = hf(rows[0]["prompt"])["input_ids"]
    assert result.counts["truncated"] == 1
    assert pair.prompt.tolist() == [hf.bos_token_id] + full_prompt[-9:]
    assert len(pair.chosen) == 14 and len(pair.rejected) == 6  # chosen cut to 24 - 10; rejected fits
    meta = PreferenceDataset(result.prefixes["train"]).metadata
    assert meta["lengths"]["prompt"]["max"] == 10 and meta["counts"]["truncated"] == 1


def test_split_is_deterministic_by_prompt_and_formats_agree(tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(tiny_example_dir(), "pairs.jsonl"))][:400]
    a = run(tmp_path, rows, name="a", valid_fraction=0.25, workers=2, chunk_size=37)
    # same rows as a JSON list and as parquet give byte-identical datasets
    with open(tmp_path / "rows.json", "w") as f:
        json.dump(rows, f)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{k: json.dumps(v) for k, v in r.items()} for r in rows]),
                   tmp_path / "rows_str.parquet")
    b = preprocess_pairs(PreprocessConfig(inputs=[str(tmp_path / "rows.json")], output_prefix=str(tmp_path / "b"),
                                    tokenizer=TINY_TOKENIZER, valid_fraction=0.25, progress=False))
    for split in ("train", "valid"):
        assert open(a.prefixes[split] + ".bin", "rb").read() == open(b.prefixes[split] + ".bin", "rb").read()
    n_valid = a.counts["valid_pairs"]
    assert 60 < n_valid < 140 and a.counts["train_pairs"] + n_valid == 400
    train_prompts = {tuple(p.prompt) for p in pairs(a.prefixes["train"])}
    assert not train_prompts & {tuple(p.prompt) for p in pairs(a.prefixes["valid"])}


def test_parquet_and_datasets_dir_inputs(tmp_path, hf):
    import datasets
    rows = [{"prompt": "sort ascending : 2 1", "chosen": " 1 2", "rejected": " 2 1"},
            {"prompt": "sort descending : 2 1", "chosen": " 2 1", "rejected": " 1 2"}]
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(renamed)}).save_to_disk(str(tmp_path / "hfds"))
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "rows.parquet"))
    for name, source in (("p", "rows.parquet"), ("d", "hfds")):
        rc = main([f"--input={tmp_path / source}", f"--output-prefix={tmp_path / name}", f"--tokenizer={TINY_TOKENIZER}",
                   "--prompt-column=question", "--chosen-column=good", "--rejected-column=bad", "--no-progress"])
        assert rc == 0
        got = pairs(str(tmp_path / f"{name}_train"))
        for row, pair in zip(rows, got):
            assert np.concatenate([pair.prompt, pair.chosen]).tolist() == \
                hf(row["prompt"] + row["chosen"])["input_ids"] + [hf.eos_token_id]

"""Dataset integrity: the metadata's checksums and token-id range are what the reader verifies, so same-size damage
(an edited length, another dataset's index, a flipped byte), a damaged header or pointer, bad metadata and token ids
outside the tokenizer's vocabulary are refused with one line naming the file, never read as shifted pairs."""
from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from megatron_dil.data import DataConfig, PreferenceDataset, PreprocessConfig, build_datasets, load_tokenizer
from megatron_dil.data.preprocess import preprocess_pairs
from megatron_dil.data.tiny_task import build_tiny_tokenizer, tiny_example_dir
from megatron_dil.data.writer import SplitWriter, publish_splits
from megatron_dil.io.files import file_record

TINY_TOKENIZER = os.path.join(tiny_example_dir(), "tokenizer")
# pairs of different lengths, so that the index of a reordering differs but has the same size
ROWS = [{"prompt": "sort ascending : " + " ".join(str(d) for d in range(9, 9 - n, -1)),
         "chosen": " " + " ".join(str(d) for d in range(10 - n, 10)),
         "rejected": " " + " ".join(str(d) for d in range(9, 9 - n, -1))} for n in (3, 4, 5, 6, 7, 8)]
LENGTHS_OFFSET = 9 + 8 + 1 + 8 + 8  # .idx: magic, version, dtype code, sequence count, document count


def preprocess(directory, rows, name):
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return preprocess_pairs(PreprocessConfig(inputs=[path], output_prefix=os.path.join(directory, name),
                                             tokenizer=TINY_TOKENIZER, progress=False)).prefixes["train"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("datasets"))
    return preprocess(directory, ROWS, "a"), preprocess(directory, ROWS[::-1], "b")


@pytest.fixture
def dataset(tmp_path, originals):
    """A fresh copy of dataset a: its prefix."""
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(originals[0] + ext, str(tmp_path / "a") + ext)
    return str(tmp_path / "a")


def patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def rerecord(prefix):
    """Rewrite the metadata's file records to the files' current content (a hand-edited or foreign dataset)."""
    with open(prefix + ".json") as f:
        metadata = json.load(f)
    metadata["files"] = {"bin": file_record(prefix + ".bin"), "idx": file_record(prefix + ".idx")}
    with open(prefix + ".json", "w") as f:
        json.dump(metadata, f)


def refused(prefix, match, **kw):
    with pytest.raises(ValueError) as error:
        PreferenceDataset(prefix, **kw)
    message = str(error.value)
    assert "\n" not in message and "rerun megatron-dil-preprocess" in message, message
    assert match in message, message


def test_metadata_records_checksums_and_token_range(originals):
    ds = PreferenceDataset(originals[0])
    files, ids = ds.metadata["files"], ds.metadata["token_ids"]
    assert files["bin"] == file_record(originals[0] + ".bin") and files["idx"] == file_record(originals[0] + ".idx")
    tokens = np.concatenate([np.concatenate([p.prompt, p.chosen, p.rejected]) for p in (ds[i] for i in range(len(ds)))])
    assert (ids["min"], ids["max"]) == (int(tokens.min()), int(tokens.max()))


@pytest.mark.parametrize("verify", ["full", "idx"])
def test_same_size_index_damage_is_refused(dataset, originals, verify):
    lengths = np.fromfile(dataset + ".idx", dtype=np.int32, count=3, offset=LENGTHS_OFFSET)
    patch(dataset + ".idx", LENGTHS_OFFSET + 4, struct.pack("<ii", lengths[1] + 1, lengths[2] - 1))  # total kept
    refused(dataset, "a.idx does not match the checksum", verify=verify)

    other = originals[1] + ".idx"  # the same pairs in another order: same sizes, another index
    assert os.path.getsize(other) == os.path.getsize(dataset + ".idx")
    shutil.copy(other, dataset + ".idx")
    refused(dataset, "a.idx does not match the checksum", verify=verify)


def test_flipped_bin_byte_is_refused_unless_verification_is_reduced(dataset):
    size = os.path.getsize(dataset + ".bin")
    with open(dataset + ".bin", "rb") as f:
        f.seek(size // 2)
        byte = f.read(1)[0]
    patch(dataset + ".bin", size // 2, bytes([byte ^ 1]))
    refused(dataset, "a.bin does not match the checksum")
    with pytest.raises(ValueError, match="a.bin does not match the checksum"):
        build_datasets(DataConfig(train=[dataset], tokenizer=TINY_TOKENIZER, max_length=64))
    # the documented opt-out: the .bin's size only (its digest would take a full read)
    assert len(build_datasets(DataConfig(train=[dataset], tokenizer=TINY_TOKENIZER, max_length=64,
                                         verify_checksums="idx"))[0]) == len(ROWS)
    with pytest.raises(ValueError, match="data.verify_checksums must be one of"):
        DataConfig(verify_checksums="none")


@pytest.mark.parametrize("damage", ["header", "pointer", "length"])
def test_damaged_index_is_refused_even_with_matching_checksums(dataset, damage):
    count = len(ROWS) * 3
    if damage == "header":
        patch(dataset + ".idx", 0, b"XXXX")
    elif damage == "pointer":  # the last sequence's pointer past the end of .bin
        patch(dataset + ".idx", LENGTHS_OFFSET + 4 * count + 8 * (count - 1), struct.pack("<q", 10**6))
    else:
        lengths = np.fromfile(dataset + ".idx", dtype=np.int32, count=3, offset=LENGTHS_OFFSET)
        patch(dataset + ".idx", LENGTHS_OFFSET + 4, struct.pack("<ii", lengths[1] + 1, lengths[2] - 1))
    refused(dataset, "a.idx does not match the checksum")
    rerecord(dataset)  # checksums recomputed over the damage: the structure check still refuses it
    refused(dataset, "a.idx cannot be read" if damage == "header" else "a.idx does not describe 6 pairs")


@pytest.mark.parametrize("damage", ["truncated", "not_an_object", "old_format", "missing_field"])
def test_bad_metadata_is_refused(dataset, damage):
    with open(dataset + ".json") as f:
        text = f.read()
    metadata = json.loads(text)
    if damage == "truncated":
        text, match = text[:len(text) // 2], "a.json is not valid JSON"
    elif damage == "not_an_object":
        text, match = "[1, 2]", "format 'list'"
    elif damage == "old_format":
        text, match = json.dumps(dict(metadata, format="megatron_dil.preference/v1")), "format 'megatron_dil."
    else:
        del metadata["files"]["bin"]
        text, match = json.dumps(metadata), "field 'files.bin' is missing or malformed"
    with open(dataset + ".json", "w") as f:
        f.write(text)
    refused(dataset, match)


def write_foreign(tmp_path, pairs):
    """A dataset whose metadata is honest about token ids the tiny tokenizer does not have."""
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    writer = SplitWriter(str(tmp_path / "foreign_train"), np.uint16)
    for pair in pairs:
        writer.add(*pair)
    writer.finalize({"tokenizer": tokenizer.identity()})
    publish_splits([writer], str(tmp_path / "foreign"))
    return writer.final_prefix


@pytest.mark.parametrize("bad_id", [47, 200])  # 47: first padding row of the tiny vocabulary; 200: past 128 padded
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, bad_id):
    assert load_tokenizer(TINY_TOKENIZER).vocab_size == 47
    prefix = write_foreign(tmp_path, [([1, 20], [21, 2], [22, 2]), ([1, 20], [bad_id, 2], [22, 2])])
    assert PreferenceDataset(prefix).metadata["token_ids"] == {"min": 1, "max": bad_id}
    with pytest.raises(ValueError) as error:
        build_datasets(DataConfig(train=[prefix], tokenizer=TINY_TOKENIZER, max_length=64))
    message = str(error.value)
    assert f"foreign_train' holds token id {bad_id} outside the vocabulary" in message and "(ids 0..46)" in message
    assert "\n" not in message


def test_tokenizer_with_id_gaps_stores_ids_exactly(tmp_path):
    # ids above 65535 in a vocabulary of 48 tokens: the vocabulary size is the id range, so .bin needs int32
    tokenizer_dir = build_tiny_tokenizer(str(tmp_path / "tok"))
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    spec["model"]["vocab"]["9"] = 70000
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.vocab_size == 70001
    rows = [{"prompt": "sort ascending : 9 1", "chosen": " 1 9", "rejected": " 9 1"}]
    with open(tmp_path / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    prefix = preprocess_pairs(PreprocessConfig(inputs=[str(tmp_path / "rows.jsonl")], tokenizer=tokenizer_dir,
                                               output_prefix=str(tmp_path / "gap"), progress=False)).prefixes["train"]
    pair = PreferenceDataset(prefix, tokenizer)[0]
    expected = tokenizer._backend("sort ascending : 9 1 1 9")["input_ids"] + [tokenizer.eos_id]
    assert np.concatenate([pair.prompt, pair.chosen]).tolist() == expected and 70000 in expected


@pytest.mark.parametrize("block", [1, 2, 4, 100])
def test_pair_layout_check_is_blockwise_exact(block):
    from megatron_dil.data.dataset import _pair_layout
    lengths = np.array([2, 3, 1, 4, 1, 1], np.int32)  # 2 pairs of uint16 tokens: 12 tokens, 24 bytes
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * 2]).astype(np.int64)
    documents = np.array([0, 3, 6])
    assert _pair_layout(lengths, pointers, documents, 2, 24, block)
    shifted = pointers.copy()
    shifted[4] += 2
    edited = lengths.copy()
    edited[3] = 3
    for args in ((edited, pointers, documents, 2, 24), (lengths, shifted, documents, 2, 24),
                 (lengths, pointers, np.array([0, 2, 6]), 2, 24), (lengths, pointers, documents, 2, 26)):
        assert not _pair_layout(*args, block)

"""Bad rows are skipped and counted by reason with their row numbers, or fail under --strict; interrupted runs
leave no dataset that looks complete; datasets from another tokenizer or too long for the run are refused."""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

import megatron_dil.data.preprocess as preprocess_module
from megatron_dil.data import DataConfig, PreferenceDataset, PreprocessConfig, build_datasets, preprocess_pairs
from megatron_dil.data.preprocess import main
from megatron_dil.data.rows import DROP_REASONS
from megatron_dil.data.tiny_task import tiny_example_dir

TINY_TOKENIZER = os.path.join(tiny_example_dir(), "tokenizer")
GOOD = {"prompt": "sort ascending : 2 1 3", "chosen": " 1 2 3", "rejected": " 3 2 1"}
CHAT = {"prompt": [{"role": "user", "content": "sort ascending : 2 1"}],
        "chosen": [{"role": "assistant", "content": "1 2"}], "rejected": [{"role": "assistant", "content": "2 1"}]}
LONG_PROMPT = "sort ascending : " + " ".join(["1"] * 40)
BAD_ROWS = {  # reason -> two offending rows of that class
    "malformed_json": ['{"prompt": "sort", "chosen": " 1"', '[1, 2'],
    "missing_field": [{"prompt": "a", "chosen": " b"}, {"chosen": " 1", "rejected": " 2"}],
    "empty_field": [dict(GOOD, chosen="   "), dict(CHAT, rejected=[{"role": "assistant", "content": ""}])],
    "non_string_content": [dict(GOOD, chosen=5), dict(CHAT, chosen=[{"role": "assistant", "content": ["1"]}])],
    "bad_role": [dict(CHAT, chosen=[{"role": "user", "content": "1 2"}]),
                 dict(CHAT, prompt=[{"role": "wizard", "content": "sort ascending : 2 1"}])],
    "identical_responses": [dict(GOOD, rejected=GOOD["chosen"]), dict(CHAT, rejected=CHAT["chosen"])],
    "prompt_too_long": [dict(GOOD, prompt=LONG_PROMPT), dict(CHAT, prompt=[{"role": "user", "content": LONG_PROMPT}])],
}


def write_rows(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def config(tmp_path, inputs, **kw):
    return PreprocessConfig(inputs=inputs, output_prefix=str(tmp_path / "out"), tokenizer=TINY_TOKENIZER,
                            max_length=32, max_prompt_length=16, progress=False, **kw)


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_rows_counted_with_row_numbers_and_strict_fails(tmp_path, capsys, reason):
    bad = BAD_ROWS[reason]
    rows = [GOOD, bad[0], CHAT, GOOD, bad[1], CHAT]  # bad rows on lines 2 and 5
    path = write_rows(tmp_path / "rows.jsonl", rows)
    result = preprocess_pairs(config(tmp_path, [path], max_rows_shown=1))
    assert result.counts["pairs_written"] == 4 and result.counts["rows_read"] == 6
    assert result.counts["dropped"] == {r: (2 if r == reason else 0) for r in DROP_REASONS}
    assert result.counts["dropped_rows"][reason] == [f"{path}:2"]  # capped by max_rows_shown
    assert PreferenceDataset(result.prefixes["train"]).metadata["counts"]["dropped"][reason] == 2
    assert len(PreferenceDataset(result.prefixes["train"])) == 4

    shutil.rmtree(tmp_path / "strict", ignore_errors=True)
    rc = main(["--input", path, "--output-prefix", str(tmp_path / "strict" / "out"), "--tokenizer", TINY_TOKENIZER,
               "--max-length", "32", "--max-prompt-length", "16", "--strict", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{path}: row 2: {reason}" in err
    assert os.listdir(tmp_path / "strict") == []  # nothing half-written, not even temporaries


def test_summary_lists_reasons_and_rows(tmp_path, capsys):
    rows = [GOOD, BAD_ROWS["malformed_json"][0], GOOD, BAD_ROWS["identical_responses"][0]]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    assert main(["--input", path, "--output-prefix", str(tmp_path / "out"), "--tokenizer", TINY_TOKENIZER,
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "rows read 4, pairs written 2" in out and "dropped 2" in out
    assert f"malformed_json: 1 (first: {path}:2)" in out and f"identical_responses: 1 (first: {path}:4)" in out


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", BAD_ROWS["missing_field"])
    with pytest.raises(preprocess_module.PreprocessError, match="no usable pair.*missing_field"):
        preprocess_pairs(config(tmp_path, [path]))
    assert os.listdir(tmp_path) == ["rows.jsonl"]


def test_interrupted_run_keeps_previous_dataset_and_leaves_no_temporaries(tmp_path, monkeypatch):
    old_rows = [GOOD, CHAT, dict(GOOD, prompt="sort ascending : 3 1 2")]
    old = preprocess_pairs(config(tmp_path, [write_rows(tmp_path / "old.jsonl", old_rows)], valid_fraction=0.5))
    before = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "out_*"))}
    calls = {"n": 0}
    real_chunk = preprocess_module._process_chunk

    def interrupted(chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_chunk(chunk)

    monkeypatch.setattr(preprocess_module, "_process_chunk", interrupted)
    new_rows = write_rows(tmp_path / "new.jsonl", [GOOD, CHAT] * 10)
    with pytest.raises(KeyboardInterrupt):
        preprocess_pairs(config(tmp_path, [new_rows], chunk_size=4, valid_fraction=0.5))
    after = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "out_*"))}
    assert after == before and not glob.glob(str(tmp_path / "*.tmp-*"))
    assert len(PreferenceDataset(old.prefixes["train"])) + len(PreferenceDataset(old.prefixes["valid"])) == 3


def test_crash_while_publishing_leaves_no_complete_looking_prefix(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, CHAT])
    preprocess_pairs(config(tmp_path, [path]))
    real_replace = os.replace

    def failing_replace(src, dst):
        if dst.endswith(".json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(preprocess_module.os, "replace", failing_replace)
    with pytest.raises(OSError):
        preprocess_pairs(config(tmp_path, [path]))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        PreferenceDataset(str(tmp_path / "out_train"))
    assert not glob.glob(str(tmp_path / "*.tmp-*"))


def test_reader_refuses_truncated_files_other_tokenizer_and_too_long(tmp_path):
    from megatron_dil.data.tiny_task import build_tiny_tokenizer
    result = preprocess_pairs(config(tmp_path, [write_rows(tmp_path / "rows.jsonl", [GOOD, CHAT] * 4)]))
    prefix = result.prefixes["train"]
    other = build_tiny_tokenizer(str(tmp_path / "other_tok"))
    with open(os.path.join(other, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]  # same size, different ids
    with open(os.path.join(other, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    with pytest.raises(ValueError, match="was tokenized with .* but the run uses"):
        build_datasets(DataConfig(train=[prefix], tokenizer=other, max_length=32))
    with pytest.raises(ValueError, match="data.max_length 8"):
        build_datasets(DataConfig(train=[prefix], tokenizer=TINY_TOKENIZER, max_length=8))
    train, valid = build_datasets(DataConfig(train=[prefix], tokenizer=TINY_TOKENIZER, max_length=32))
    assert len(train) == 8 and valid is None
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=r"out_train.bin has \d+ bytes but \d+ were written.*rerun megatron-dil-pre"):
        PreferenceDataset(prefix)


def test_every_cli_flag_is_explained_and_bad_flags_are_named(tmp_path, capsys):
    from megatron_dil.data.preprocess import build_parser
    for action in build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    path = write_rows(tmp_path / "rows.jsonl", [GOOD])
    assert main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer", TINY_TOKENIZER,
                 "--valid-fraction", "1.5"]) == 1
    assert "--valid-fraction must be in [0, 1)" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", TINY_TOKENIZER]) == 1
    assert "missing.jsonl' does not exist" in capsys.readouterr().err
    assert main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer", TINY_TOKENIZER,
                 "--template", "nope"]) == 1
    assert "unknown --template 'nope'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]


def cli(tmp_path, inputs, *extra, tokenizer=TINY_TOKENIZER, prefix=None):
    return main(["--input", *inputs, "--output-prefix", prefix or str(tmp_path / "o"), "--tokenizer", tokenizer,
                 "--no-progress", *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-dil-preprocess: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_encoding_problems_name_file_row_and_fix(tmp_path, capsys):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(GOOD).encode() + b"\n" +
                       '{"prompt": "tré : 2 1", "chosen": " 1 2", "rejected": " 2 1"}\n'.encode("latin-1"))
    assert cli(tmp_path, [str(latin1)]) == 1
    err = one_line_error(capsys)
    assert f"{latin1}: row 2: byte 0xe9 at column 15 is not UTF-8" in err and "iconv" in err
    as_json = tmp_path / "latin1.json"
    as_json.write_bytes(b"[\n" + json.dumps(GOOD).encode() + b",\n" + latin1.read_bytes().splitlines()[1] + b"\n]")
    assert cli(tmp_path, [str(as_json)]) == 1
    assert f"{as_json}: row 3: byte 0xe9" in one_line_error(capsys)

    bom = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark is not part of the first row
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n" + json.dumps(CHAT) + "\n").encode())
    bom_json = tmp_path / "bom.json"
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD, CHAT]).encode())
    for path in (bom, bom_json):
        assert cli(tmp_path, [str(path)]) == 0
        assert "rows read 2, pairs written 2" in capsys.readouterr().out


def test_unreadable_inputs_tokenizers_and_outputs_are_one_line(tmp_path, capsys):
    good = write_rows(tmp_path / "rows.jsonl", [GOOD, CHAT])
    fake = tmp_path / "rows.parquet"
    fake.write_text(json.dumps(GOOD) + "\n")
    assert cli(tmp_path, [str(fake)]) == 1
    err = one_line_error(capsys)
    assert f"{fake}: not a readable Parquet file" in err and "--input-format jsonl" in err
    not_a_dataset = tmp_path / "dir"
    not_a_dataset.mkdir()
    assert cli(tmp_path, [str(not_a_dataset)]) == 1
    assert f"{not_a_dataset}: not a directory written by datasets.save_to_disk" in one_line_error(capsys)

    truncated = tmp_path / "truncated_tok"
    shutil.copytree(TINY_TOKENIZER, truncated)
    spec = (truncated / "tokenizer.json").read_text()
    (truncated / "tokenizer.json").write_text(spec[:len(spec) // 2])
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    for tokenizer in (truncated, empty):
        assert cli(tmp_path, [good], tokenizer=str(tokenizer)) == 1
        err = one_line_error(capsys)
        assert f"tokenizer '{tokenizer}' cannot be loaded" in err and "Hugging Face tokenizer directory" in err

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli(tmp_path, [good], prefix=str(blocker / "sub" / "out")) == 1
    assert f"--output-prefix {blocker}/sub/out: cannot create the directory" in one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "dir", "empty_tok", "rows.jsonl", "rows.parquet",
                                           "truncated_tok"]


def test_template_that_rejects_a_conversation_drops_the_row(tmp_path):
    tokenizer = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER, tokenizer)
    template = (tokenizer / "chat_template.jinja").read_text()
    (tokenizer / "chat_template.jinja").write_text(  # Llama-2 style convention: user and assistant alternate
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% endfor %}" + template)
    two_users = dict(CHAT, prompt=CHAT["prompt"] * 2)
    path = write_rows(tmp_path / "rows.jsonl", [CHAT, two_users, CHAT])
    result = preprocess_pairs(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "out"),
                                               tokenizer=str(tokenizer), progress=False))
    assert result.counts["dropped"]["template_error"] == 1 and result.counts["dropped_rows"]["template_error"] == [
        f"{path}:2"] and result.counts["pairs_written"] == 2

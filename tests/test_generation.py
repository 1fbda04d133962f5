"""Generation on real gloo ranks against transformers: greedy tokens at TP=1/2, PP=2, TP=2×PP=2 (Llama, Qwen2);
log-probs against a full forward; sampled first-token frequencies against softmax(z/T) (plain, top-k, top-p) with
padded vocabulary ids never drawn and every TP rank agreeing; same seed ⇒ same samples at DP=1/2/4 and after a
resume; one-line errors for bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_convert_models import random_model

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP) on 4 ranks: DP = 4 / (TP·PP)
PROMPTS = {"llama": [[1, 9, 14, 23, 5, 11], [1, 7, 30], [1, 40, 41, 8, 17, 19, 4, 22, 6], [1, 12, 12]],
           "qwen2": [[150, 3, 77, 199, 8], [11, 120, 127], [5, 64, 128, 33, 98, 190, 45, 6]]}
EOS = {"llama": 41, "qwen2": 135}  # ids these random models do generate: some rows end with reason "eos"
MAX_NEW = 8
SAMPLING = [dict(temperature=1.5), dict(temperature=1.0, top_k=6), dict(temperature=0.8, top_p=0.7),
            dict(temperature=1.0, top_k=12, top_p=0.8)]
DRAWS = 3000


def hf_configs() -> dict:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    return {"llama": LlamaConfig(**common, vocab_size=47, bos_token_id=1, eos_token_id=2),  # the tiny tokenizer's
            "qwen2": Qwen2Config(**common, vocab_size=200, tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random HF Llama (tiny-task tokenizer, vocabulary 47 padded to 128·TP) and Qwen2 (QKV bias, tied, vocabulary
    200 padded to 256), converted at TP=1 and TP=2."""
    from megatron_dil.convert import hf_to_megatron
    from megatron_dil.data.tiny_task import tiny_example_dir

    root = tmp_path_factory.mktemp("generation")
    out = {"root": root, "hf": {}, "checkpoints": {}}
    for seed, (name, config) in enumerate(hf_configs().items()):
        model = random_model(config, seed)
        model.save_pretrained(root / name)
        if name == "llama":
            for file in Path(tiny_example_dir(), "tokenizer").iterdir():
                shutil.copy(file, root / name)
        out["hf"][name] = model
        out["checkpoints"][name] = {}
        for tp in (1, 2):
            path = root / f"{name}_tp{tp}"
            hf_to_megatron(root / name, path, tensor_parallel=tp, pipeline_parallel=1, progress=False)
            out["checkpoints"][name][tp] = str(path)
    return out


def cli_config(models, output: Path, tp: int, pp: int, **kwargs):
    from megatron_dil.generation.cli import GenerateConfig
    from megatron_dil.generation.sampler import SamplingConfig

    return GenerateConfig(checkpoint=models["checkpoints"]["llama"][tp], prompts=str(models["root"] / "prompts.jsonl"),
                          output=str(output), tensor_parallel=tp, pipeline_parallel=pp, batch_size=5,
                          max_new_tokens=6, n=3, progress=False,
                          sampling=SamplingConfig(temperature=1.0, top_k=10, seed=3), **kwargs)


def _all_on_four_ranks(rank: int, world_size: int, checkpoints: dict, cli: dict) -> dict:
    """Greedy decode at every layout for both models; 3000 one-token samples per sampling setting (Qwen2, TP=2);
    the CLI at DP=4, DP=1 (TP=2×PP=2) and DP=2 (TP=2), and a resume from a part file of an 8-rank run."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dil.convert import MegatronCheckpoint, load_megatron_checkpoint
    from megatron_dil.generation import writer
    from megatron_dil.generation.cli import generation_settings, run
    from megatron_dil.generation.decode import DecodeLimits, DecodeRequest
    from megatron_dil.generation.engine import generate
    from megatron_dil.generation.sampler import SamplingConfig
    from megatron_dil.models.builder import build_model
    from megatron_dil.runtime import ParallelConfig, initialize

    out = {"greedy": {}, "sampled": {}}

    def load(name: str, tp: int, pp: int):
        model_cfg = MegatronCheckpoint(checkpoints[name][tp]).model
        initialize(ParallelConfig(tensor=tp, pipeline=pp), model_cfg, seed=1)
        chunks = build_model(model_cfg)
        load_megatron_checkpoint(chunks, checkpoints[name][tp])
        return chunks[0], model_cfg

    for name in ("llama", "qwen2"):
        for tp, pp in LAYOUTS:
            model, model_cfg = load(name, tp, pp)
            requests = [DecodeRequest(p, i, 0) for i, p in enumerate(PROMPTS[name])]
            completions = generate(model, requests, SamplingConfig(temperature=0.0),
                                   DecodeLimits(MAX_NEW, 64, (EOS[name],)), model_cfg.vocab_size, batch_size=3)
            out["greedy"][(name, tp, pp)] = None if completions is None else [
                (c.token_ids, c.logprobs, c.finish_reason) for c in completions]
            if (name, tp, pp) == ("llama", 2, 2):  # a stop token ends a row with reason "stop"
                stopped = generate(model, requests[:1], SamplingConfig(temperature=0.0),
                                   DecodeLimits(MAX_NEW, 64, (EOS[name],), (cli["stop_id"],)), model_cfg.vocab_size,
                                   batch_size=1)
                out["stopped"] = None if stopped is None else (stopped[0].token_ids, stopped[0].finish_reason)
            parallel_state.destroy_model_parallel()

    model, model_cfg = load("qwen2", 2, 1)
    for index, setting in enumerate(SAMPLING):
        requests = [DecodeRequest(PROMPTS["qwen2"][0], 0, s) for s in range(DRAWS)]
        completions = generate(model, requests, SamplingConfig(seed=index, **setting), DecodeLimits(1, 64, ()),
                               model_cfg.vocab_size, batch_size=DRAWS)
        out["sampled"][index] = [c.token_ids[0] for c in completions]
    parallel_state.destroy_model_parallel()

    for key, (tp, pp) in (("dp4", (1, 1)), ("dp1", (2, 2)), ("dp2", (2, 1))):
        run(cli_config(cli, Path(cli["outputs"]) / f"{key}.jsonl", tp, pp))

    # a training run's checkpoints/iter_N (no final/ yet): the run directory resolves to it
    model, _ = load("llama", 1, 1)
    run_dir = Path(cli["root"]) / "train_run"
    if rank == 0:
        from megatron_dil.config import from_dict, save_config
        from megatron_dil.training.config import RunConfig

        iteration = run_dir / "checkpoints" / "iter_0000003"
        iteration.mkdir(parents=True)
        save_config(from_dict(RunConfig, {"output_dir": str(run_dir), "init": {"checkpoint": checkpoints["llama"][1]},
                                          "data": {"train": ["unused"], "tokenizer": str(Path(cli["root"]) / "llama")}}),
                    run_dir / "config.yaml")
        torch.save({"model": [model.state_dict()], "scheduler": {}}, iteration / "model_tp00_pp000.pt")
        from megatron_dil.io import record_files

        (iteration / "state.json").write_text(json.dumps(  # as the trainer writes it: layout and file records
            {"iteration": 3, "layout": {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "data": 4},
             "files": record_files(iteration, ["model_tp00_pp000.pt"])}))
        (run_dir / "checkpoints" / "latest").write_text("iter_0000003")
    parallel_state.destroy_model_parallel()
    dist.barrier()
    from_run = cli_config(cli, Path(cli["outputs"]) / "iter.jsonl", 1, 1)
    from_run.checkpoint = str(run_dir)
    run(from_run)
    resumed = cli_config(cli, Path(cli["outputs"]) / "resumed.jsonl", 2, 1)
    if rank == 0:  # an interrupted 8-rank run left 10 samples and a cut line
        writer.prepare(Path(resumed.output), generation_settings(resumed))
        lines = (Path(cli["outputs"]) / "dp1.jsonl").read_text().splitlines(keepends=True)
        part = writer.partial_dir(Path(resumed.output)) / "rank_00007.jsonl"
        part.write_text("".join(lines[5:15]) + lines[15][:30])
    dist.barrier()
    out["resumed_rows"] = run(resumed)

    from megatron_dil.data.tokenizer import load_tokenizer
    from megatron_dil.generation.config import GenerationEvalConfig
    from megatron_dil.generation.evaluator import GenerationEvaluator

    model, model_cfg = load("llama", 2, 1)  # DP=2: the prompts are split and gathered back
    evaluator = GenerationEvaluator(
        GenerationEvalConfig(prompts=resumed.prompts, max_prompts=10, max_new_tokens=6, batch_size=4,
                             verifier="tiny_sort", samples_shown=10),
        load_tokenizer(str(Path(cli["root"]) / "llama")), window=64, vocab_size=model_cfg.vocab_size)
    out["evaluation"] = evaluator.run(10, [model])
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def four_ranks(models):
    from megatron_dil.data.tiny_task import tiny_example_dir

    rows = Path(tiny_example_dir(), "pairs.jsonl").read_text().splitlines()[:12]
    (models["root"] / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    outputs = models["root"] / "cli"
    outputs.mkdir()
    greedy = hf_greedy(models["hf"]["llama"], PROMPTS["llama"][0], EOS["llama"])
    cli = {"checkpoints": models["checkpoints"], "root": models["root"], "outputs": str(outputs),
           "stop_id": greedy[2]}
    results = run_ranks(_all_on_four_ranks, 4, models["checkpoints"], cli)
    return results, outputs


def hf_greedy(model, prompt: list[int], eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def hf_token_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion_t | prompt, completion_<t) from one transformers forward of the whole sequence (float64
    log-softmax of its fp32 logits)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    logps = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
    return logps.gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_matches_transformers_at_every_layout_and_logprobs_match_a_full_forward(models, four_ranks, name):
    results, _ = four_ranks
    hf = models["hf"][name]
    expected = [hf_greedy(hf, p, EOS[name]) for p in PROMPTS[name]]
    for tp, pp in LAYOUTS:
        per_rank = [r["greedy"][(name, tp, pp)] for r in results]
        last_stage = [c for c in per_rank if c is not None]
        assert len(last_stage) == 4 // pp  # every last-stage rank (all TP ranks, all DP replicas) returns
        for completions in last_stage:
            assert [c[0] for c in completions] == expected, (tp, pp)
            for prompt, (tokens, logps, reason) in zip(PROMPTS[name], completions):
                reference = hf_token_logprobs(hf, prompt, tokens)
                assert torch.allclose(torch.tensor(logps, dtype=torch.float64), reference, atol=1e-5, rtol=0)
                assert reason == ("eos" if tokens[-1] == EOS[name] else "length")
                assert reason == "eos" or len(tokens) == MAX_NEW
        assert {c[2] for c in last_stage[0]} == {"eos", "length"}  # both ways of ending are exercised


def test_stop_token_ends_a_row(models, four_ranks):
    results, _ = four_ranks
    greedy = hf_greedy(models["hf"]["llama"], PROMPTS["llama"][0], EOS["llama"])
    first = greedy.index(greedy[2])
    stopped = [r["stopped"] for r in results if r["stopped"] is not None]
    assert len(stopped) == 2 and all(s == (greedy[:first + 1], "stop") for s in stopped)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """transformers' order: temperature, top-k, then top-p on the renormalised top-k (float64)."""
    z = logits.double() / temperature
    if top_k:
        threshold = z.topk(top_k).values[-1]
        z = z.masked_fill(z < threshold, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[before < top_p]] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, categories with expected count < 5 pooled; p = Q(df/2, χ²/2)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)]).double()
    expect = torch.cat([expected[big], expected[~big].sum().view(1)])
    if expect[-1] < 5:  # the pooled tail is too small: merge it into the smallest big category
        observed, expect = observed[:-1].clone(), expect[:-1].clone()
        observed[expect.argmin()] += counts[~big].sum()
        expect[expect.argmin()] += expected[~big].sum()
    statistic = ((observed - expect) ** 2 / expect).sum()
    df = len(expect) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def test_sampled_first_tokens_follow_the_filtered_softmax_and_agree_over_tp(models, four_ranks):
    results, _ = four_ranks
    hf = models["hf"]["qwen2"]
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS["qwen2"][0]])).logits[0, -1]
    vocab = hf.config.vocab_size
    for index, setting in enumerate(SAMPLING):
        draws = [r["sampled"][index] for r in results]
        assert all(d == draws[0] for d in draws)  # both TP ranks and both DP replicas drew the same tokens
        tokens = torch.tensor(draws[0])
        assert len(tokens) == DRAWS and int(tokens.max()) < vocab and int(tokens.min()) >= 0
        probs = _filtered_probs(logits, **setting)
        counts = torch.bincount(tokens, minlength=vocab).double()
        assert counts[probs == 0].sum() == 0, setting  # nothing outside the top-k / nucleus
        p_value = chi_square_p_value(counts, probs)
        assert p_value > 1e-3, (setting, p_value)
    # the statistic has power: the unfiltered draws do not fit the top-k distribution
    unfiltered = torch.bincount(torch.tensor(results[0]["sampled"][0]), minlength=vocab).double()
    assert chi_square_p_value(unfiltered, _filtered_probs(logits, 1.0)) < 1e-6


def test_same_seed_same_samples_at_any_dp_size_after_resume_and_from_a_training_checkpoint(models, four_ranks):
    from megatron_dil.data.tokenizer import load_tokenizer
    from megatron_dil.generation.prompts import tokenize_prompt
    from megatron_dil.data.templates import resolve_template

    results, outputs = four_ranks
    rows = {key: [json.loads(line) for line in (outputs / f"{key}.jsonl").read_text().splitlines()]
            for key in ("dp4", "dp1", "dp2", "resumed", "iter")}
    assert results[0]["resumed_rows"] == 36 and not list(outputs.glob("*.partial"))
    assert [(r["prompt_index"], r["sample_index"]) for r in rows["dp1"]] == [(p, s) for p in range(12)
                                                                             for s in range(3)]
    for key in ("dp4", "dp2", "resumed", "iter"):  # iter: the same weights from a training checkpoint
        for mine, reference in zip(rows[key], rows["dp1"], strict=True):
            assert mine["completion_token_ids"] == reference["completion_token_ids"], key
            assert mine["completion"] == reference["completion"] and mine["prompt"] == reference["prompt"]
            assert mine["finish_reason"] == reference["finish_reason"]
            assert max(abs(a - b) for a, b in zip(mine["logprobs"], reference["logprobs"])) < 1e-5
    assert len({tuple(r["completion_token_ids"]) for r in rows["dp1"]}) > 20  # samples differ by (prompt, index)
    # the logged log-probs are those of a full forward of the finished sequence
    tokenizer = load_tokenizer(str(models["root"] / "llama"))
    template = resolve_template("auto", tokenizer)[1]
    for row in rows["dp2"][:6]:
        prompt = tokenize_prompt(row["prompt"], tokenizer, template)
        reference = hf_token_logprobs(models["hf"]["llama"], prompt, row["completion_token_ids"])
        assert torch.allclose(torch.tensor(row["logprobs"], dtype=torch.float64), reference, atol=1e-5, rtol=0)


def _error_line(capfd, argv: list[str]) -> str:
    from megatron_dil.generation.cli import main

    assert main(argv) == 1
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_ends_in_one_line(models, tmp_path, capfd):
    from megatron_dil.data.tokenizer import load_tokenizer
    from megatron_dil.generation.prompts import load_prompts

    llama = models["checkpoints"]["llama"][1]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "sort ascending : 3 1 2"}) + "\n")
    base = ["--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl")]

    err = _error_line(capfd, ["--checkpoint", str(tmp_path / "missing"), *base])
    assert "--checkpoint" in err and "missing" in err

    other = tmp_path / "other_tokenizer"  # same kind of tokenizer, another vocabulary
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(40)} | {"<unk>": 40}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w2", unk_token="<unk>").save_pretrained(other)
    err = _error_line(capfd, ["--checkpoint", llama, "--tokenizer", str(other), *base])
    assert "--tokenizer" in err and "is not the tokenizer of" in err

    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": "sort ascending : 1"}) + "\n"
                            + json.dumps({"prompt": " ".join(["7"] * 70)}) + "\n")
    err = _error_line(capfd, ["--checkpoint", llama, "--prompts", str(long_prompts), "--output",
                               str(tmp_path / "o.jsonl")])
    assert f"{long_prompts}: row 2" in err and "window of 64" in err

    messy = tmp_path / "messy.jsonl"
    messy.write_text("\n".join([
        json.dumps({"prompt": "sort ascending : 3 1 2"}),
        "{not json",
        json.dumps({"question": "no prompt column"}),
        json.dumps({"prompt": [{"role": "user", "content": "sort descending : 4 5"}]}),
        json.dumps({"prompt": 5}),
        json.dumps({"prompt": "   "}),
        json.dumps([1, 2]),
    ]) + "\n")
    result = load_prompts(str(messy), load_tokenizer(str(models["root"] / "llama")), window=64)
    assert [p.source for p in result.prompts] == ["sort ascending : 3 1 2",
                                                  [{"role": "user", "content": "sort descending : 4 5"}]]
    assert dict(result.skipped) == {"malformed_json": 2, "missing_field": 1, "non_string_content": 1,
                                    "empty_field": 1}
    assert result.skipped_rows["malformed_json"] == [f"{messy}:2", f"{messy}:7"]
    assert "skipped 5 rows" in result.summary()

    out = tmp_path / "exists.jsonl"
    out.write_text("")
    err = _error_line(capfd, ["--checkpoint", llama, "--prompts", str(prompts), "--output", str(out)])
    assert "--output" in err and "--overwrite" in err


def test_tiny_sort_verifier():
    from megatron_dil.generation.verifier import tiny_sort

    chat = [{"role": "user", "content": "sort descending : 7 8 2 8"}]
    assert tiny_sort("sort ascending : 7 8 2 8", "2 7 8 8") == 1.0
    assert tiny_sort(chat, "8 8 7 2") == 1.0
    assert tiny_sort(chat, "2 7 8 8") == 0.0  # the other order
    assert tiny_sort(chat, "8 8 7 2 2") == 0.0  # an extra digit
    assert tiny_sort(chat, "8 7 2") == 0.0  # a dropped duplicate
    assert tiny_sort("<s> <|user|> sort ascending : 3 1 2 <|end|> <|assistant|>", "1 2 3") == 1.0  # decoded prompt
    assert tiny_sort("what is 2 + 2", "4") is None


def test_generation_evaluator_scores_greedy_completions(models, four_ranks):
    from megatron_dil.data.tokenizer import load_tokenizer
    from megatron_dil.generation.prompts import load_prompts
    from megatron_dil.generation.verifier import tiny_sort

    results, _ = four_ranks
    evaluations = [r["evaluation"] for r in results]
    assert [e is None for e in evaluations] == [False] * 4  # PP=1: every rank is a last stage
    tokenizer = load_tokenizer(str(models["root"] / "llama"))
    prompts = load_prompts(str(models["root"] / "prompts.jsonl"), tokenizer, window=64, limit=10).prompts
    hf = models["hf"]["llama"]
    expected = []
    for prompt in prompts:
        ids = hf_greedy(hf, prompt.ids, tokenizer.eos_id)[:6]
        text = tokenizer.decode(ids[:-1] if ids[-1] == tokenizer.eos_id else ids)
        expected.append({"prompt": prompt.source, "completion": text, "score": tiny_sort(prompt.source, text)})
    for evaluation in evaluations:
        assert evaluation.step == 10 and evaluation.num_prompts == 10 and evaluation.scored == 10
        assert evaluation.samples == expected
        assert evaluation.correct == sum(e["score"] for e in expected)
        assert "generate @ step 10: 10 prompts | verifier" in evaluation.summary()


def test_quickstart_pipeline_configs():
    """The quick start's two stages are valid run configs chained through runs/tiny_sft/final, and its script parses."""
    import subprocess

    from megatron_dil.config import load_config
    from megatron_dil.training.config import RunConfig

    examples = Path(__file__).resolve().parents[1] / "examples"
    sft = load_config(RunConfig, examples / "tiny" / "sft.yaml")
    dil = load_config(RunConfig, examples / "tiny" / "dil_lsif_sft.yaml")
    assert sft.loss.name == "sft" and sft.model is not None
    assert dil.loss.name == "dil_lsif" and dil.init.checkpoint == f"{sft.output_dir}/final"
    assert dil.data == sft.data and dil.output_dir != sft.output_dir
    assert subprocess.run(["bash", "-n", str(examples / "quickstart.sh")]).returncode == 0


def test_prompts_from_an_indexed_dataset_and_from_rows_agree(tmp_path):
    """An indexed preference dataset gives each distinct prompt once, with the ids preprocessing stored — the same
    ids the JSONL rows tokenize to — and its decoded text is what the verifier reads."""
    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.dataset import PreferenceDataset
    from megatron_dil.data.preprocess import preprocess_pairs
    from megatron_dil.data.tiny_task import tiny_example_dir
    from megatron_dil.data.tokenizer import load_tokenizer
    from megatron_dil.generation.prompts import load_prompts
    from megatron_dil.generation.verifier import tiny_sort

    rows = Path(tiny_example_dir(), "pairs.jsonl").read_text().splitlines()[:20]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(rows + rows[:5]) + "\n")  # 5 prompts twice
    tokenizer_dir = str(Path(tiny_example_dir(), "tokenizer"))
    prefix = preprocess_pairs(PreprocessConfig(inputs=[str(pairs)], output_prefix=str(tmp_path / "d"),
                                               tokenizer=tokenizer_dir, max_length=32, max_prompt_length=16,
                                               valid_fraction=0.0, progress=False)).prefixes["train"]
    tokenizer = load_tokenizer(tokenizer_dir)
    from_dataset = load_prompts(prefix, tokenizer, window=64).prompts
    from_rows = load_prompts(str(pairs), tokenizer, window=64, limit=20).prompts
    dataset = PreferenceDataset(prefix)
    assert len(dataset) == 25 and len(from_dataset) == 20
    assert [p.ids for p in from_dataset] == [p.ids for p in from_rows] == [dataset[i].prompt.tolist()
                                                                         for i in range(20)]
    for prompt, row in zip(from_dataset, from_rows):
        assert prompt.source == row.source[0]["content"]  # decoded without the template's special tokens
        chosen = json.loads(rows[row.index])["chosen"][0]["content"]
        assert tiny_sort(prompt.source, chosen) == 1.0


def test_cli_flags_pass_through_torchrun():
    """torchrun's parser (abbreviations allowed) would take a flag of ours that is a prefix of one of its own (as
    `--n` was): none may be."""
    from torch.distributed.run import get_args_parser

    from megatron_dil.generation.cli import build_parser

    theirs = [o for action in get_args_parser()._actions for o in action.option_strings if o.startswith("--")]
    ours = [o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")]
    assert [(o, t) for o in ours for t in theirs if t.startswith(o) and o != "--help"] == []

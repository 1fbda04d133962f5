"""Every preference loss, its gradients and metrics against float64 references written here from the formulas;
DIL against a transcription of the released code (TRL 0.8.6 DPOTrainer fork, scripts/dpo_trainer.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megatron_dil.losses import (EXP_EXPONENT_LIMIT, LOSSES, LossConfig, MetricAccumulator, PairLogProbs,
                                 assert_finite, build_loss, find_nonfinite)
from megatron_dil.ops import SequenceLogProbs, sequence_logprobs, vocab_parallel_logprobs
from tests.distributed import init_gloo, run_ranks

# Large |f| on purpose (|β·h| up to ~6 for β = 0.1; exp(2·30) for LSIF); ORPO's ℓ̄ reaches −1e-3.
F_VALUES = torch.tensor([-30.0, -7.5, -1.3, -0.21, 0.37, 2.9, 11.0, 30.0])


def f64_log_sigmoid(x):
    """log σ(x) = −log(1 + e^{−x}) for x ≥ 0, x − log(1 + e^{x}) for x < 0: finite for any float64 x."""
    return torch.where(x >= 0, -torch.log1p(torch.exp(-x.clamp(min=0))), x - torch.log1p(torch.exp(x.clamp(max=0))))


def f64_sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def make_pairs(reduction: str, seed: int) -> dict[str, torch.Tensor]:
    """fp32 per-sequence sums and counts whose reduced log-probs give f_w, f_l spanning F_VALUES."""
    gen = torch.Generator().manual_seed(seed)
    n = len(F_VALUES)
    counts = {side: torch.randint(3, 40, (n,), generator=gen).float() for side in ("chosen", "rejected")}
    policy = {side: -torch.rand(n, generator=gen) * 20 - 1e-3 for side in ("chosen", "rejected")}
    f = {"chosen": F_VALUES[torch.randperm(n, generator=gen)], "rejected": F_VALUES[torch.randperm(n, generator=gen)]}
    scale = {side: counts[side] if reduction == "avg" else torch.ones(n) for side in counts}
    out = {}
    for side in ("chosen", "rejected"):
        out[f"policy_{side}"] = policy[side] * scale[side]
        out[f"ref_{side}"] = (policy[side] - f[side]) * scale[side]
        out[f"count_{side}"] = counts[side]
    return out


def reduced(data: dict[str, torch.Tensor], key: str, reduction: str) -> torch.Tensor:
    value = data[key]
    return value / data["count_" + key.split("_")[1]] if reduction == "avg" else value


# name -> (config overrides, float64 reference: (lw, ll, rw, rl, nll_w, cfg) -> per-pair loss)
def _fdpo(f_prime):
    def loss(lw, ll, rw, rl, nll, beta):
        uw, ul = torch.exp(lw - rw), torch.exp(ll - rl)
        return -f64_log_sigmoid(beta * (f_prime(uw) - f_prime(ul)))
    return loss


def _kto(lw, ll, rw, rl, nll, beta):
    fw, fl = lw - rw, ll - rl
    zw, zl = max(float(fw.detach().mean()), 0.0), max(float(fl.detach().mean()), 0.0)
    return 0.5 * ((1 - f64_sigmoid(beta * (fw - zl))) + (1 - f64_sigmoid(beta * (zw - fl))))


def _orpo(lw, ll, rw, rl, nll, lam):
    pw, pl = torch.exp(lw), torch.exp(ll)
    return nll - lam * f64_log_sigmoid(torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl)))


CASES = {
    "dil_lsif": ({}, "avg", lambda lw, ll, rw, rl, nll: -torch.exp(lw - rw) + 0.5 * torch.exp(2 * (ll - rl))),
    "dil_lsif_sum_sft": ({"name": "dil_lsif", "logps": "sum", "sft_weight": 0.3}, "sum",
                         lambda lw, ll, rw, rl, nll: -torch.exp(lw - rw) + 0.5 * torch.exp(2 * (ll - rl)) + 0.3 * nll),
    "dil_bce": ({}, "avg", lambda lw, ll, rw, rl, nll: -f64_log_sigmoid(lw - rw) - f64_log_sigmoid(-(ll - rl))),
    "dil_ukl": ({}, "avg", lambda lw, ll, rw, rl, nll: -(lw - rw) + torch.exp(ll - rl)),
    "dpo": ({}, "sum", lambda lw, ll, rw, rl, nll: -f64_log_sigmoid(0.1 * ((lw - rw) - (ll - rl)))),
    "dpo_smoothed_sft": ({"name": "dpo", "beta": 0.05, "label_smoothing": 0.2, "sft_weight": 1.5}, "sum",
                         lambda lw, ll, rw, rl, nll: -0.8 * f64_log_sigmoid(0.05 * ((lw - rw) - (ll - rl)))
                         - 0.2 * f64_log_sigmoid(-0.05 * ((lw - rw) - (ll - rl))) + 1.5 * nll),
    "ipo": ({}, "avg", lambda lw, ll, rw, rl, nll: (((lw - rw) - (ll - rl)) - 1 / (2 * 0.1)) ** 2),
    "slic": ({"beta": 0.3}, "sum", lambda lw, ll, rw, rl, nll: torch.clamp(1 - 0.3 * ((lw - rw) - (ll - rl)), min=0)),
    "kto_pair": ({}, "sum", lambda lw, ll, rw, rl, nll: _kto(lw, ll, rw, rl, nll, 0.1)),
    "fdpo_reverse_kl": ({"name": "fdpo"}, "sum", lambda *a: _fdpo(torch.log)(*a, 0.1)),
    "fdpo_forward_kl": ({"name": "fdpo", "fdpo_divergence": "forward_kl"}, "sum",
                        lambda *a: _fdpo(lambda u: -1 / u)(*a, 0.1)),
    "fdpo_js": ({"name": "fdpo", "fdpo_divergence": "js"}, "sum",
                lambda *a: _fdpo(lambda u: torch.log(2 * u / (1 + u)))(*a, 0.1)),
    "fdpo_alpha": ({"name": "fdpo", "fdpo_divergence": "alpha", "fdpo_alpha": 0.3}, "sum",
                   lambda *a: _fdpo(lambda u: (1 - u ** -0.3) / 0.3)(*a, 0.1)),
    "cpo": ({"label_smoothing": 0.1, "cpo_alpha": 0.7}, "sum",
            lambda lw, ll, rw, rl, nll: -0.9 * f64_log_sigmoid(0.1 * (lw - ll)) - 0.1 * f64_log_sigmoid(-0.1 * (lw - ll))
            + 0.7 * nll),
    "simpo": ({"simpo_gamma_beta_ratio": 0.8}, "avg",
              lambda lw, ll, rw, rl, nll: -f64_log_sigmoid(2.0 * (lw - ll) - 0.8 * 2.0)),
    "orpo": ({"orpo_lambda": 0.25}, "avg", lambda lw, ll, rw, rl, nll: _orpo(lw, ll, rw, rl, nll, 0.25)),
    "sft": ({}, "avg", lambda lw, ll, rw, rl, nll: nll),
}
REWARD_SCALE = {"dpo": 0.1, "dpo_smoothed_sft": 0.05, "ipo": 0.1, "slic": 0.3, "kto_pair": 0.1, "cpo": 0.1,
                "simpo": 2.0, "orpo": 0.25}


def test_every_registered_loss_is_tested():
    assert set(LOSSES) <= {CASES[c][0].get("name", c) for c in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_match_float64_reference(case):
    overrides, reduction, reference_fn = CASES[case]
    cfg = LossConfig(**{"name": case, **overrides})
    loss = build_loss(cfg)
    assert loss.logps == reduction
    data = make_pairs(reduction, seed=len(case))
    weights = torch.linspace(0.5, 1.5, len(F_VALUES))
    keys = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")

    leaves = {k: data[k].clone().requires_grad_() for k in keys}
    seq = {k: SequenceLogProbs(leaves[k], data["count_" + k.split("_")[1]]) for k in keys}
    policy = PairLogProbs(seq["policy_chosen"], seq["policy_rejected"])
    reference = PairLogProbs(seq["ref_chosen"], seq["ref_rejected"]) if loss.needs_reference else None
    out = loss(policy, reference)
    assert out.losses.dtype == torch.float32
    (out.losses * weights).sum().backward()

    ref_leaves = {k: data[k].double().requires_grad_() for k in keys}
    data64 = {**{k: v.double() for k, v in data.items()}, **ref_leaves}
    lw, ll, rw, rl = (reduced(data64, k, reduction) for k in keys)
    nll = -data64["policy_chosen"] / data64["count_chosen"]
    want = reference_fn(lw, ll, rw, rl, nll)
    (want * weights.double()).sum().backward()

    torch.testing.assert_close(out.losses.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for k in keys:
        if not loss.needs_reference and k.startswith("ref"):
            continue
        expected = torch.zeros_like(ref_leaves[k]) if ref_leaves[k].grad is None else ref_leaves[k].grad
        got = torch.zeros_like(leaves[k]) if leaves[k].grad is None else leaves[k].grad
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7,
                                   msg=lambda text, k=k: f"d loss / d {k}: {text}")

    # Metrics: TRL names, implicit rewards, accuracies, DIL's f and exp(f), token-weighted NLL.
    m = out.metrics
    scale = REWARD_SCALE.get(case, 0.1 if cfg.name == "fdpo" else 1.0)
    reward_w = scale * ((lw - rw) if loss.needs_reference else lw).detach()
    reward_l = scale * ((ll - rl) if loss.needs_reference else ll).detach()
    torch.testing.assert_close(m["rewards/chosen"].double(), reward_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards/rejected"].double(), reward_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards/margins"].double(), reward_w - reward_l, rtol=1e-5, atol=1e-5)
    assert torch.equal(m["rewards/accuracies"], (m["rewards/chosen"] > m["rewards/rejected"]).float())
    torch.testing.assert_close(m["logps/chosen"].double(), lw.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["logps/rejected"].double(), ll.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["loss"], out.losses.detach())
    torch.testing.assert_close(m["nll/chosen"], -data["policy_chosen"])
    torch.testing.assert_close(out.token_counts["nll/chosen"], data["count_chosen"])
    if cfg.name.startswith("dil"):
        torch.testing.assert_close(m["dil/f_chosen"].double(), (lw - rw).detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m["dil/exp_f_rejected"].double(), torch.exp(ll - rl).detach(), rtol=1e-5, atol=0)
    assert all(not v.requires_grad and v.shape == (len(F_VALUES),) for v in m.values())


def _seq(values, counts=None):
    values = torch.tensor(values, dtype=torch.float32)
    return SequenceLogProbs(values, torch.ones_like(values) if counts is None else torch.tensor(counts))


def test_exp_overflow_raises_or_is_reported():
    policy = PairLogProbs(_seq([-10.0, -10.0, -10.0]), _seq([-10.0, 40.0, -12.0]))
    reference = PairLogProbs(_seq([-11.0, -11.0, -11.0]), _seq([-10.0, -10.0, -10.0]))  # f_l = 50 in pair 1
    with pytest.raises(FloatingPointError, match=r"dil_lsif: exp\(2·f_rejected\).*f_rejected = 50"):
        build_loss(LossConfig(logps="sum"))(policy, reference)
    out = build_loss(LossConfig(logps="sum", overflow="report"))(policy, reference)
    assert torch.isfinite(out.losses).all()
    assert float(out.losses[1]) == pytest.approx(-math.e + 0.5 * math.exp(EXP_EXPONENT_LIMIT), rel=1e-5)
    assert out.metrics["numerics/exp_clamped"].tolist() == [0.0, 1.0, 0.0]
    f_dpo = build_loss(LossConfig(name="fdpo", fdpo_divergence="forward_kl"))
    with pytest.raises(FloatingPointError, match=r"fdpo: exp\(-1·f_chosen\).*f_chosen = -80"):
        f_dpo(PairLogProbs(_seq([-91.0]), _seq([-5.0])), PairLogProbs(_seq([-11.0]), _seq([-5.0])))


def test_nonfinite_hook_names_bad_entries():
    assert find_nonfinite(torch.tensor([1.0, -2.0]), "losses") is None
    with pytest.raises(FloatingPointError, match=r"losses has 1 NaN and 1 Inf of 4 entries; first: \[1\]=nan, \[3\]=inf"):
        assert_finite(torch.tensor([0.0, float("nan"), 1.0, float("inf")]), "losses")


def test_build_loss_validates_config():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'; valid losses: cpo, dil_bce, dil_lsif"):
        build_loss(LossConfig(name="dpoo"))
    with pytest.raises(ValueError, match="'dil_lsif' takes no beta"):
        build_loss(LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="label_smoothing = 0.1 is not used by loss 'ipo'"):
        build_loss(LossConfig(name="ipo", label_smoothing=0.1))
    with pytest.raises(ValueError, match="logps must be"):
        build_loss(LossConfig(logps="mean"))
    with pytest.raises(ValueError, match="fdpo_divergence must be one of"):
        build_loss(LossConfig(name="fdpo", fdpo_divergence="kl"))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        build_loss(LossConfig(name="dpo"))(PairLogProbs(_seq([-1.0]), _seq([-2.0])), None)
    for name, cls in LOSSES.items():  # literature defaults and reference-freeness
        loss = build_loss(LossConfig(name=name))
        assert loss.beta == {"dpo": 0.1, "ipo": 0.1, "slic": 0.1, "kto_pair": 0.1, "fdpo": 0.1, "cpo": 0.1,
                             "simpo": 2.0}.get(name)
        assert loss.needs_reference == (name not in {"cpo", "simpo", "orpo", "sft"})
        if not loss.needs_reference:
            assert torch.isfinite(loss(PairLogProbs(_seq([-1.0]), _seq([-2.0])), None).losses).all()


# ---- The released DIL code, transcribed (TRL 0.8.6 DPOTrainer fork: get_batch_logps + dpo_loss) ----
def released_get_batch_logps(logits, labels, average_log_prob=True, label_pad_token_id=-100):
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[labels == label_pad_token_id] = 0
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token_logps * loss_mask).sum(-1)


def released_dil_loss(loss_type, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    chosen_rewards = policy_chosen - reference_chosen
    rejected_rewards = policy_rejected - reference_rejected
    if loss_type == "LSIF":
        losses = -torch.exp(chosen_rewards) + 0.5 * torch.exp(2.0 * rejected_rewards)
    elif loss_type == "UKL":
        losses = -policy_chosen + torch.exp(policy_rejected - reference_rejected)
    else:  # BCE
        losses = -torch.nn.functional.logsigmoid(chosen_rewards) - torch.nn.functional.logsigmoid(-rejected_rewards)
    return losses.mean()


def test_dil_reproduces_released_code_from_logits():
    gen = torch.Generator().manual_seed(2025)
    pairs, length, vocab = 3, 12, 37
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)  # rows: chosen 0..2, rejected 0..2
    prompt_lengths, response_ends = [4, 2, 6, 4, 2, 6], [12, 9, 11, 10, 12, 8]
    for row, (start, end) in enumerate(zip(prompt_lengths, response_ends)):
        labels[row, :start] = -100
        labels[row, end:] = -100
    logits = {m: torch.randn(2 * pairs, length, vocab, generator=gen) * 2 for m in ("policy", "reference")}

    released = {m: released_get_batch_logps(logits[m].double(), labels) for m in logits}

    targets, mask = labels[:, 1:], labels[:, 1:] != -100
    sequence_index = torch.arange(2 * pairs).unsqueeze(1).expand(-1, length - 1)
    ours = {}
    for m in logits:
        token_logps = vocab_parallel_logprobs(logits[m][:, :-1], targets, None, chunk_size=7)
        seq = sequence_logprobs(token_logps, mask, sequence_index, 2 * pairs)
        ours[m] = PairLogProbs(SequenceLogProbs(seq.sum[:pairs], seq.count[:pairs]),
                               SequenceLogProbs(seq.sum[pairs:], seq.count[pairs:]))
    for name, loss_type in (("dil_lsif", "LSIF"), ("dil_bce", "BCE"), ("dil_ukl", "UKL")):
        out = build_loss(LossConfig(name=name))(ours["policy"], ours["reference"])
        want = released_dil_loss(loss_type, released["policy"][:pairs], released["policy"][pairs:],
                                 released["reference"][:pairs], released["reference"][pairs:])
        if name == "dil_ukl":  # released UKL uses −ℓ_w where the paper has −f_w = −(ℓ_w − ℓ^ref_w)
            want = want + released["reference"][:pairs].mean()
        torch.testing.assert_close(out.losses.mean().double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.metrics["logps/chosen"].double(), released["policy"][:pairs], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.metrics["logps/rejected"].double(), released["policy"][pairs:], rtol=1e-5,
                                   atol=1e-6)


# ---- Metric reduction over micro-batches and DP ranks ----
def _micro_batches(rank: int) -> list:
    gen = torch.Generator().manual_seed(rank)
    sizes = [3, 2] if rank == 0 else [4]
    batches = []
    for n in sizes:
        policy = PairLogProbs(SequenceLogProbs(-torch.rand(n, generator=gen) * 30, torch.randint(1, 20, (n,), generator=gen).float()),
                              SequenceLogProbs(-torch.rand(n, generator=gen) * 30, torch.randint(1, 20, (n,), generator=gen).float()))
        reference = PairLogProbs(SequenceLogProbs(-torch.rand(n, generator=gen) * 30, torch.ones(n) * 5),
                                 SequenceLogProbs(-torch.rand(n, generator=gen) * 30, torch.ones(n) * 5))
        batches.append((policy, reference))
    return batches


def _metrics_worker(rank: int, world_size: int) -> dict[str, float]:
    init_gloo()
    loss, accumulator = build_loss(LossConfig(name="dpo")), MetricAccumulator()
    for policy, reference in _micro_batches(rank):
        out = loss(policy, reference)
        accumulator.add(out.metrics, out.token_counts)
    return accumulator.reduce(dist.group.WORLD)


def test_metric_accumulator_reduces_over_micro_batches_and_dp():
    per_rank = run_ranks(_metrics_worker, 2)
    assert per_rank[0] == per_rank[1]
    outs = [build_loss(LossConfig(name="dpo"))(p, r) for rank in (0, 1) for p, r in _micro_batches(rank)]
    for name in ("loss", "rewards/chosen", "rewards/accuracies", "logps/rejected"):  # sample-weighted: mean over pairs
        want = torch.cat([o.metrics[name] for o in outs]).double().mean()
        assert per_rank[0][name] == pytest.approx(float(want), rel=1e-12)
    nll_tokens = torch.cat([o.metrics["nll/chosen"] for o in outs]).double().sum()
    tokens = torch.cat([o.token_counts["nll/chosen"] for o in outs]).double().sum()
    assert per_rank[0]["nll/chosen"] == pytest.approx(float(nll_tokens / tokens), rel=1e-12)  # token-weighted

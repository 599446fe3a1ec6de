"""Tests for lightning_meddpo.losses: every loss against its formula on hand-computed values (the
expected numbers are computed here with `math` on Python floats, never by the function under test),
gradient directions, the special cases that tie formulations together, and numerical stability."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meddpo import losses as L

BETA = 0.1
# Three pairs; h_w = PC - RC = [1, -1, 1], h_l = PR - RR = [-1, 1, -1], D = [2, -2, 2].
PC = [-10.0, -20.0, -5.0]
PR = [-12.0, -18.0, -9.0]
RC = [-11.0, -19.0, -6.0]
RR = [-11.0, -19.0, -8.0]
NC = [3, 4, 2]
NR = [5, 2, 6]
B = len(PC)


def t(values, *, grad: bool = False, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def ls(x: float) -> float:
    """log sigma(x), computed with math (x moderate)."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def h(i: int) -> tuple[float, float]:
    return PC[i] - RC[i], PR[i] - RR[i]


def close(actual: torch.Tensor, expected: list[float], rel: float = 1e-5, abs_: float = 1e-6) -> None:
    assert actual.shape == (len(expected),)
    assert actual.dtype == torch.float32
    assert actual.tolist() == pytest.approx(expected, rel=rel, abs=abs_)


def same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Tensor equality up to float32 rounding (torch.testing.assert_close costs ~1 s to import)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-7), (actual, expected)


def pair(pc=None, pr=None, rc=None, rr=None, tokens: bool = True) -> L.PairLogps:
    """The shared test point as a PairLogps (any side replaceable), with the token counts unless told not."""
    return L.PairLogps(t(PC) if pc is None else pc, t(PR) if pr is None else pr, t(RC) if rc is None else rc,
                       t(RR) if rr is None else rr, t(NC) if tokens else None, t(NR) if tokens else None)


def margin_only(margin: torch.Tensor) -> L.PairLogps:
    """A pair whose DPO margin is `margin` (the policy's chosen side carries it, the rest is 0)."""
    zeros = torch.zeros_like(margin)
    return L.PairLogps(margin, zeros, zeros, zeros)


def dpo(loss_type: str, **kwargs) -> torch.Tensor:
    return L.dpo_loss(pair(), beta=BETA, loss_type=loss_type, **kwargs)


# ---------------------------------------------------------------------------------------------
# DPO family: values
# ---------------------------------------------------------------------------------------------


def expected_dpo(loss_type: str, e: float = 0.0, tau: float = 0.05, delta: float = 0.0) -> list[float]:
    out = []
    for i in range(B):
        hw, hl = h(i)
        d = hw - hl
        z = BETA * d
        if loss_type == "sigmoid":
            out.append(-(1 - e) * ls(z) - e * ls(-z))
        elif loss_type == "ipo":
            out.append(((hw / NC[i] - hl / NR[i]) - 1 / (2 * BETA)) ** 2)
        elif loss_type == "sigmoid_norm":  # TRL 1.16's: the sigmoid on length-normalised log-ratios
            out.append(-ls(BETA * (hw / NC[i] - hl / NR[i])))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - z))
        elif loss_type == "robust":
            out.append((-(1 - e) * ls(z) + e * ls(-z)) / (1 - 2 * e))
        elif loss_type == "exo_pair":
            eps = e if e > 0 else 1e-3
            out.append(sig(z) * (ls(z) - math.log(1 - eps)) + sig(-z) * (ls(-z) - math.log(eps)))
        elif loss_type == "nca_pair":
            out.append(-ls(BETA * hw) - 0.5 * ls(-BETA * hw) - 0.5 * ls(-BETA * hl))
        elif loss_type == "bco_pair":
            out.append(-ls(BETA * hw - delta) - ls(-(BETA * hl - delta)))
        elif loss_type == "sppo_hard":
            out.append((hw - 0.5 / BETA) ** 2 + (hl + 0.5 / BETA) ** 2)
        elif loss_type == "apo_zero":
            out.append(1 - sig(BETA * hw) + sig(BETA * hl))
        elif loss_type == "apo_down":
            out.append(sig(BETA * hw) + 1 - sig(z))
        elif loss_type == "discopop":
            mix = sig(z / tau)
            out.append(-ls(z) * (1 - mix) + math.exp(-z) * mix)
        else:
            raise AssertionError(loss_type)
    return out


@pytest.mark.parametrize(
    "loss_type",
    [
        "sigmoid", "sigmoid_norm", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
        "apo_zero", "apo_down", "discopop",
    ],
)
def test_dpo_family_matches_formula(loss_type: str) -> None:
    close(dpo(loss_type), expected_dpo(loss_type))


def test_hand_numbers_for_sigmoid_and_ipo() -> None:
    # A sanity anchor with literally hand-written numbers: D = 2, beta 0.1 -> -log sigma(0.2).
    assert dpo("sigmoid")[0].item() == pytest.approx(0.5981388693, rel=1e-6)
    # IPO pair 0: (1/3 - (-1)/5 - 5)^2 = (8/15 - 5)^2 = (-67/15)^2
    assert dpo("ipo")[0].item() == pytest.approx((67 / 15) ** 2, rel=1e-6)


@pytest.mark.parametrize("e", [0.1, 0.3])
def test_label_smoothed_types_match_formula(e: float) -> None:
    close(dpo("sigmoid", label_smoothing=e), expected_dpo("sigmoid", e=e))  # cDPO
    close(dpo("robust", label_smoothing=e), expected_dpo("robust", e=e))
    close(dpo("exo_pair", label_smoothing=e), expected_dpo("exo_pair", e=e))


def test_cdpo_at_zero_smoothing_is_dpo_and_robust_at_zero_is_dpo() -> None:
    plain = [-ls(BETA * (h(i)[0] - h(i)[1])) for i in range(B)]
    close(dpo("sigmoid", label_smoothing=0.0), plain)
    same(dpo("robust", label_smoothing=0.0), dpo("sigmoid", label_smoothing=0.0))
    # And with the margin function called directly.
    margin = t([2.0, -2.0, 2.0])
    same(L.robust_loss(margin_only(margin), beta=BETA), L.sigmoid_loss(margin_only(margin), beta=BETA))


def test_exo_pair_zero_smoothing_uses_trl_epsilon() -> None:
    same(dpo("exo_pair", label_smoothing=0.0), dpo("exo_pair", label_smoothing=1e-3))


def test_discopop_tau_and_stability() -> None:
    close(dpo("discopop", discopop_tau=1.0), expected_dpo("discopop", tau=1.0))
    # Default tau is 0.05 (the paper's and TRL's).
    close(dpo("discopop"), expected_dpo("discopop", tau=0.05))
    # Very negative margin: the naive exp(-rho) * sigma(rho/tau) is inf * 0 = nan.
    margin = t([-2000.0, 2000.0], grad=True)
    loss = L.discopop_loss(margin_only(margin), beta=BETA)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(200.0, rel=1e-5)  # -log sigma(-200) ~ 200
    loss.sum().backward()
    assert torch.isfinite(margin.grad).all()


def test_bco_pair_delta_and_batch_reward_mean() -> None:
    close(dpo("bco_pair", bco_delta=0.05), expected_dpo("bco_pair", delta=0.05))
    close(dpo("bco_pair", bco_delta=torch.tensor(0.05)), expected_dpo("bco_pair", delta=0.05))
    mean = L.bco_batch_reward_mean(pair(), beta=BETA)
    expected = sum(BETA * (PC[i] - RC[i]) + BETA * (PR[i] - RR[i]) for i in range(B)) / (2 * B)
    assert mean.item() == pytest.approx(expected, abs=1e-7)


def test_aot_sorts_across_batch() -> None:
    for e in (0.0, 0.2):
        pol = sorted(PC[i] - PR[i] for i in range(B))
        ref = sorted(RC[i] - RR[i] for i in range(B))
        expected = [-(1 - e) * ls(BETA * (p - r)) - e * ls(-BETA * (p - r)) for p, r in zip(pol, ref)]
        close(dpo("aot", label_smoothing=e), expected)
        hw = sorted(h(i)[0] for i in range(B))
        hl = sorted(h(i)[1] for i in range(B))
        expected_u = [-(1 - e) * ls(BETA * (a - b)) - e * ls(-BETA * (a - b)) for a, b in zip(hw, hl)]
        close(dpo("aot_unpaired", label_smoothing=e), expected_u)


def test_dpo_family_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo("nope")
    with pytest.raises(ValueError, match="chosen_tokens"):
        L.dpo_loss(pair(tokens=False), loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo("discopop", discopop_tau=0.0)


# ---------------------------------------------------------------------------------------------
# DPO family: gradient directions
# ---------------------------------------------------------------------------------------------

# Sign of d loss / d policy_chosen at the shared test point; d loss / d policy_rejected is > 0 for all.
# apo_down is built to push the chosen likelihood down as well (its purpose: the model is better than
# the chosen answers), so there raising the chosen log-prob raises the loss.
CHOSEN_SIGN = {name: -1 for name in L.DPO_LOSS_TYPES} | {"apo_down": +1}


@pytest.mark.parametrize("loss_type", sorted(L.DPO_LOSS_TYPES))
def test_dpo_family_gradient_signs(loss_type: str) -> None:
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    loss = L.dpo_loss(pair(pc, pr), beta=BETA, loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    loss.sum().backward()
    assert (torch.sign(pc.grad) == CHOSEN_SIGN[loss_type]).all(), pc.grad
    assert (pr.grad > 0).all(), pr.grad


def test_registry_covers_requested_types() -> None:
    assert set(L.DPO_LOSS_TYPES) == {
        "sigmoid", "sigmoid_norm", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
    }


# ---------------------------------------------------------------------------------------------
# Reference-free
# ---------------------------------------------------------------------------------------------


def test_simpo_matches_formula_and_gradients() -> None:
    beta, gamma = 2.0, 0.5
    expected = [-ls(beta * (PC[i] / NC[i] - PR[i] / NR[i]) - gamma) for i in range(B)]
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    loss = L.simpo_loss(pc, pr, t(NC), t(NR), beta=beta, gamma=gamma)
    close(loss, expected)
    loss.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_cpo_matches_formula_and_gradients() -> None:
    beta, w = 0.2, 0.7
    expected = [-ls(beta * (PC[i] - PR[i])) + w * (-PC[i] / NC[i]) for i in range(B)]
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    loss = L.cpo_loss(pc, pr, t(NC), beta=beta, nll_weight=w)
    close(loss, expected)
    loss.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # Defaults: beta 0.1, nll weight 1.
    close(L.cpo_loss(t(PC), t(PR), t(NC)), [-ls(0.1 * (PC[i] - PR[i])) - PC[i] / NC[i] for i in range(B)])


def _orpo_expected(cw: float, rw: float, nc: int, nr: int, lam: float) -> float:
    def log_odds(lp: float) -> float:
        return lp - math.log(-math.expm1(lp))

    aw, al = cw / nc, rw / nr
    return -aw - lam * ls(log_odds(aw) - log_odds(al))


def test_orpo_matches_formula_and_gradients() -> None:
    cw, rw, nc, nr = [-0.9, -6.0, -3.0], [-3.6, -4.0, -30.0], [3, 4, 2], [3, 2, 6]
    lam = 0.25
    pc, pr = t(cw, grad=True), t(rw, grad=True)
    loss = L.orpo_loss(pc, pr, t(nc), t(nr), lam=lam)
    close(loss, [_orpo_expected(cw[i], rw[i], nc[i], nr[i], lam) for i in range(3)])
    loss.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orpo_stable_near_zero_and_very_negative(dtype) -> None:
    # Length-normalised log-probs from p ~ 1 (log-prob ~ 0, odds huge) to p ~ 0 (log-prob << 0).
    chosen = t([0.0, -1e-9, -1e-6, -1e-3, -50.0, -1000.0, -1e4], grad=True, dtype=dtype)
    rejected = t([-1e4, -1000.0, -50.0, -1e-3, -1e-6, -1e-9, 0.0], grad=True, dtype=dtype)
    ones = torch.ones(7)
    loss = L.orpo_loss(chosen, rejected, ones, ones, lam=0.1)
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    if dtype == torch.float32:
        # Match float64 math (log odds -> logp for very negative logp). Log-probs above -eps(float32)
        # are clamped to -eps (documented: odds capped at ~1/eps), so compare those against -eps.
        eps = torch.finfo(torch.float32).eps
        for i in (2, 3, 4, 5, 6):
            cw, rw = min(chosen[i].item(), -eps), min(rejected[i].item(), -eps)
            expected = _orpo_expected(cw, rw, 1, 1, 0.1)
            assert loss[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    lo = L.log_odds(t([-1e-6, -1000.0]))
    assert lo.tolist() == pytest.approx([-1e-6 - math.log(1e-6), -1000.0], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Multimodal
# ---------------------------------------------------------------------------------------------


def test_copo_matches_formula_and_gradients() -> None:
    pm, pmp, rm, rmp = [-10.0, -7.0], [-13.0, -6.0], [-11.0, -7.5], [-12.0, -7.0]
    expected = [-ls(BETA * ((pm[i] - rm[i]) - (pmp[i] - rmp[i]))) for i in range(2)]
    a, b = t(pm, grad=True), t(pmp, grad=True)
    loss = L.copo_loss(L.PairLogps(a, b, t(rm), t(rmp)), beta=BETA)
    close(loss, expected)
    loss.sum().backward()
    assert (a.grad < 0).all() and (b.grad > 0).all()


def test_copo_with_mprime_equal_m_is_log2() -> None:
    pm, rm = t([-10.0, -3.0, -40.0]), t([-11.0, -2.0, -35.0])
    close(L.copo_loss(L.PairLogps(pm, pm.clone(), rm, rm.clone()), beta=BETA), [math.log(2)] * 3)


def test_anchor_matches_formula_and_gradient() -> None:
    pc = t([-10.0, -20.0], grad=True)
    rc = [-11.0, -15.0]
    loss = L.anchor_loss(pc, t(rc), beta=BETA, delta=0.3)
    close(loss, [-ls(BETA * (-10.0 + 11.0) - 0.3), -ls(BETA * (-20.0 + 15.0) - 0.3)])
    loss.sum().backward()
    assert (pc.grad < 0).all()


def test_mmedpo_matches_formula_and_gradients() -> None:
    w = [0.61, 1.0, 0.0]
    pc, pr = t(PC, grad=True), t(PR, grad=True)
    loss = L.mmedpo_loss(pair(pc, pr), t(w), beta=BETA)
    close(loss, [w[i] * -ls(BETA * (h(i)[0] - h(i)[1])) for i in range(B)])
    loss.sum().backward()
    assert (pc.grad[:2] < 0).all() and (pr.grad[:2] > 0).all()
    assert pc.grad[2] == 0 and pr.grad[2] == 0  # zero weight, no signal


@pytest.mark.parametrize(
    "weights, match",
    [
        (None, "weights"),
        (torch.tensor([1.0, float("nan"), 1.0]), "finite"),
        (torch.tensor([1.0, float("inf"), 1.0]), "finite"),
        (torch.tensor([1.0, 1.0]), "shape"),
        (torch.tensor([1.0, -0.5, 1.0]), ">= 0"),
    ],
)
def test_mmedpo_rejects_missing_or_bad_weights(weights, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        L.mmedpo_loss(pair(), weights, beta=BETA)


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------


def test_kto_kl_baseline_mean_clamped_detached() -> None:
    p = t([-5.0, -7.0, -3.0], grad=True)
    assert L.kto_kl_baseline(p, t([-6.0, -8.0, -3.5])).item() == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    z = L.kto_kl_baseline(p, t([-6.0, -4.0, -3.0]))  # mean (1 - 3 + 0)/3 < 0 -> 0
    assert z.item() == 0.0
    assert not z.requires_grad and z.shape == ()


def test_kto_matches_formula_and_gradients() -> None:
    pol, ref = [-10.0, -12.0, -8.0, -9.0], [-11.0, -11.0, -8.5, -9.5]
    des = [True, False, True, False]
    z0, wd, wu = 0.3, 1.0, 1.5
    expected = [
        wd * (1 - sig(BETA * (hi - z0))) if d else wu * (1 - sig(BETA * (z0 - hi)))
        for hi, d in zip([p_ - r_ for p_, r_ in zip(pol, ref)], des)
    ]
    p = t(pol, grad=True)
    z = torch.tensor(z0, requires_grad=True)
    loss = L.kto_loss(p, t(ref), torch.tensor(des), z, beta=BETA, desirable_weight=wd, undesirable_weight=wu)
    close(loss, expected)
    loss.sum().backward()
    assert (p.grad[torch.tensor(des)] < 0).all()  # raising a desirable log-prob lowers the loss
    assert (p.grad[~torch.tensor(des)] > 0).all()  # raising an undesirable one raises it
    assert z.grad is None  # the baseline is detached
    with pytest.raises(ValueError, match="bool"):
        L.kto_loss(p, t(ref), torch.tensor([1, 0, 1, 0]), z0, beta=BETA)


# ---------------------------------------------------------------------------------------------
# Combining and the name registry
# ---------------------------------------------------------------------------------------------


def test_combine_is_weighted_sum() -> None:
    a, b, c = t([1.0, 2.0]), t([0.5, -1.0]), t([3.0, 3.0])
    close(L.combine({"a": a, "b": b, "c": c}, {"a": 0.5, "b": 2.0}), [0.5 * 1 + 2 * 0.5 + 3, 0.5 * 2 + 2 * -1 + 3])
    close(L.combine({"a": a}, {}), [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown"):
        L.combine({"a": a}, {"a": 1.0, "typo": 1.0})
    with pytest.raises(ValueError, match="no loss terms"):
        L.combine({}, {})


def test_mdpo_combination_uses_mprime() -> None:
    # mDPO = DPO + CoPO + anchor; with a corrupted image the CoPO term differs from log 2.
    dpo_term = dpo("sigmoid")
    copo_term = L.copo_loss(L.PairLogps(t(PC), t([-14.0, -25.0, -9.0]), t(RC), t([-13.0, -22.0, -8.0])), beta=BETA)
    anchor_term = L.anchor_loss(t(PC), t(RC), beta=BETA)
    total = L.combine({"dpo": dpo_term, "copo": copo_term, "anchor": anchor_term}, {"copo": 1.0, "anchor": 0.5})
    same(total, dpo_term + copo_term + 0.5 * anchor_term)
    assert not torch.allclose(copo_term, torch.full_like(copo_term, math.log(2)))


def test_nll_and_rewards() -> None:
    close(L.nll_loss(t(PC), t([3, 0, 2])), [10 / 3, 20.0, 2.5])  # zero tokens clamp to 1
    r = L.rewards(t(PC, grad=True), t(RC), BETA)
    close(r, [0.1, -0.1, 0.1])
    assert not r.requires_grad



def test_nll_reductions_sequence_and_token() -> None:
    """"sequence": the mean of per-sequence means (the paper's); "token": TRL's `sft`, one mean over all
    chosen tokens of the batch."""
    logps, tokens = t(PC, grad=True), t(NC)
    seq = L.reduce_nll(logps, tokens, "sequence")
    assert float(seq) == pytest.approx((10 / 3 + 20 / 4 + 5 / 2) / 3)
    tok = L.reduce_nll(logps, tokens, "token")
    assert float(tok) == pytest.approx(35 / 9)
    tok.backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 9] * 3)  # every token weighs the same: lowering the NLL raises logp
    with pytest.raises(ValueError, match="nll_reduction"):
        L.reduce_nll(logps, tokens, "pair")

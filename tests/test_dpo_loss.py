"""DPO and IPO losses against hand-computed values, their gradients, and sequence log-probabilities."""
import math

import pytest
import torch

from lightning_modules.dpo import dpo_loss, ipo_loss, mean_token_kl, sequence_logps
from models.gpt import build_gpt, resolve_spec

# two pairs; log-ratios: chosen (-1) - (-2) = 1 and (-2) - (-2) = 0, rejected (-3) - (-2) = -1 and (-1) - (-2) = 1,
# so the margins h = chosen - rejected are +2 (right way round) and -1 (wrong way round)
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def test_dpo_loss_equals_hand_computed_value():
    loss, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5)
    # -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.3132617; -log sigmoid(0.5 * -1) = log(1 + e^0.5) = 0.9740770
    assert loss.item() == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]  # rewards = beta * log-ratio


def test_dpo_beta_scales_the_margin():
    # beta = 0.1: log(1 + e^-0.2) = 0.5981389, log(1 + e^0.1) = 0.7443967
    assert dpo_loss(PC, PR, RC, RR, beta=0.1)[0].item() == pytest.approx((0.5981389 + 0.7443967) / 2, abs=1e-6)
    # swapping chosen and rejected flips each margin's sign: the wrong-way pair now costs less
    swapped = dpo_loss(PR, PC, RR, RC, beta=0.5)[0].item()
    assert swapped == pytest.approx((math.log1p(math.e) + math.log1p(math.exp(-0.5))) / 2, abs=1e-6)
    assert swapped > dpo_loss(PC, PR, RC, RR, beta=0.5)[0].item()


def test_ipo_loss_equals_hand_computed_value():
    loss, chosen, rejected = ipo_loss(PC, PR, RC, RR, beta=0.5)
    # target margin 1 / (2 * 0.5) = 1: (2 - 1)^2 = 1, (-1 - 1)^2 = 4
    assert loss.item() == pytest.approx(2.5)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]
    # beta = 0.25: target 2, (2 - 2)^2 = 0, (-1 - 2)^2 = 9; a margin past the target is pulled back
    assert ipo_loss(PC, PR, RC, RR, beta=0.25)[0].item() == pytest.approx(4.5)
    over = ipo_loss(torch.tensor([5.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), beta=0.5)[0]
    assert over.item() == pytest.approx(16.0)


# IPO: both margins below its target 5
@pytest.mark.parametrize(("loss_fn", "beta"), [(dpo_loss, 0.5), (ipo_loss, 0.1)])
def test_gradients_raise_chosen_and_lower_rejected(loss_fn, beta):
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    loss_fn(pc, pr, RC, RR, beta)[0].backward()
    # descent moves along -grad: up for the chosen log-probs, down for the rejected ones
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # the wrong-way pair (h = -1) pulls harder than the right-way one (h = +2)
    assert pc.grad[1].abs() > pc.grad[0].abs()


@pytest.mark.parametrize("loss_fn", [dpo_loss, ipo_loss])
@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_non_positive_beta_is_rejected(loss_fn, beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        loss_fn(PC, PR, RC, RR, beta)


def test_sequence_logps_sums_token_log_probs_after_the_bos():
    torch.manual_seed(0)
    model = build_gpt(resolve_spec("gpt2-1l", n_embd=16, n_head=2, n_positions=8),
                      vocab_size=7, bos_id=6, pad_id=5).eval()
    ids = torch.tensor([[6, 1, 2, 3, 0], [6, 4, 4, 1, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.log_softmax(-1)
        expected = torch.stack([sum(logits[b, t - 1, ids[b, t]] for t in range(1, 5)) for b in range(2)])
        got = sequence_logps(model, ids)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got < 0).all()


def test_token_kl_is_zero_for_equal_models_and_positive_otherwise():
    p = torch.randn(3, 4, 6).log_softmax(-1)
    q = torch.randn(3, 4, 6).log_softmax(-1)
    assert mean_token_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert mean_token_kl(p, q).item() > 0

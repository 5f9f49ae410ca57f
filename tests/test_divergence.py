import pytest
import torch

from rxf.divergence import masked_mean, output_divergence, symmetric_kl, symmetric_squared_error


def reference_symmetric_kl(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    kl_pq = (p * (p.log() - q.log())).sum(-1)
    kl_qp = (q * (q.log() - p.log())).sum(-1)
    return (kl_pq + kl_qp).mean()


def test_symmetric_kl_matches_reference_and_is_symmetric_and_nonnegative():
    torch.manual_seed(0)
    for _ in range(5):
        p, q = torch.randn(16, 5), torch.randn(16, 5)
        value = symmetric_kl(p, q)
        assert value.dtype == torch.float32
        assert value.item() >= 0
        assert torch.allclose(value, symmetric_kl(q, p), atol=1e-7)
        assert abs(value.item() - reference_symmetric_kl(p, q).item()) < 1e-6
    assert symmetric_kl(p, p).item() == 0.0


def test_symmetric_kl_is_float32_under_bf16_autocast():
    p = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(4, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = symmetric_kl(p, q)
    assert value.dtype == torch.float32
    value.backward()
    assert p.grad is not None and torch.isfinite(p.grad.float()).all()
    assert abs(value.item() - reference_symmetric_kl(p.float(), q.float()).item()) < 1e-5


def test_masked_positions_contribute_nothing():
    torch.manual_seed(1)
    p, q = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    before = symmetric_kl(p, q, mask)
    q2 = q.clone()
    q2[mask == 0] = torch.randn_like(q2[mask == 0]) * 100
    assert torch.equal(before, symmetric_kl(p, q2, mask))
    assert masked_mean(torch.ones(3), torch.zeros(3)).item() == 0.0


def test_regression_uses_squared_error():
    p, q = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [1.0]])
    assert output_divergence(p, q).item() == pytest.approx((0.25 + 1.0) / 2)
    assert symmetric_squared_error(p, q).item() == symmetric_squared_error(q, p).item()

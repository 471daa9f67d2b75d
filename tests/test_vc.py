"""VC restores the variance it targets on synthetic data with a known variance drift."""

import torch

from cachequant.correction.vc import VCStats, apply_vc, fit_vc


def test_pure_variance_drift_is_undone_exactly():
    torch.manual_seed(0)
    x = torch.randn(64, 4, 8, 8)
    k = torch.tensor([1.3, 0.7, 1.0, 2.0]).view(1, 4, 1, 1)
    s = fit_vc(x * k, x)
    torch.testing.assert_close(s, 1 / k.flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(apply_vc(x * k, s), x, rtol=1e-5, atol=1e-5)


def test_variance_restored_under_drift_plus_noise_per_step():
    torch.manual_seed(1)
    T, C = 5, 3
    st = VCStats(T, C)
    drift = torch.linspace(1.0, 1.5, T)  # variance inflation grows along the trajectory
    data = []
    for t in range(T):
        x = torch.randn(256, C, 4, 4)
        xh = x * drift[t] + 0.2 * torch.randn_like(x)  # plus error uncorrelated with x
        st.update(t, xh, x)
        data.append((x, xh))
    s = st.solve()
    for t, (x, xh) in enumerate(data):
        before = (xh.var(dim=(0, 2, 3)) / x.var(dim=(0, 2, 3)) - 1).abs().max()
        after = (apply_vc(xh, s[t]).var(dim=(0, 2, 3)) / x.var(dim=(0, 2, 3)) - 1).abs().max()
        assert after < 0.02 and after < 0.5 * before, (t, float(before), float(after))


def test_learned_sigma_half_untouched_and_unseen_steps_identity():
    out = torch.randn(2, 8, 4, 4)
    y = apply_vc(out, torch.full((4,), 2.0))
    torch.testing.assert_close(y[:, :4], 2 * out[:, :4])
    torch.testing.assert_close(y[:, 4:], out[:, 4:])
    assert torch.equal(VCStats(3, 2).solve(), torch.ones(3, 2))


def test_gamma_zero_is_least_squares_and_large_gamma_matches_variance():
    torch.manual_seed(2)
    x = torch.randn(512, 2, 4, 4)
    xh = x + 0.5 * torch.randn_like(x)
    ls = (xh * x).sum(dim=(0, 2, 3)) / (xh * xh).sum(dim=(0, 2, 3))
    torch.testing.assert_close(fit_vc(xh, x, gamma=0.0), ls.float(), rtol=1e-5, atol=1e-6)
    s = fit_vc(xh, x, gamma=1e6)
    torch.testing.assert_close((s.view(1, 2, 1, 1) * xh).var(dim=(0, 2, 3)), x.var(dim=(0, 2, 3)),
                               rtol=1e-3, atol=1e-4)

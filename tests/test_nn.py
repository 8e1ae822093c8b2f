"""ActiveShift2d, the shift variants and the original training rule for shifts."""
import pytest
import torch
import torch.nn.functional as F

from asl_cli.nn import (
    ActiveShift2d,
    grouped_shift,
    install_shift_grad_normalization,
    normalize_shift_grad_,
    param_groups,
    shift_layers,
)
from asl_cli.ops import active_shift


def smooth_images(n, c, h, w, sigma=2.5):
    x = torch.randn(n * c, 1, h, w, dtype=torch.float64)
    k = torch.arange(-7, 8, dtype=torch.float64)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (7, 7, 0, 0), mode="circular"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, 7, 7), mode="circular"), k.view(1, 1, -1, 1))
    return (x / x.std()).view(n, c, h, w)


def test_learns_known_shifts():
    """Regression onto the input moved by known shifts: the gradient must drive the shifts there."""
    torch.manual_seed(1)
    C = 6
    true = torch.tensor([[0.4, -0.7], [1.3, 0.2], [-1.1, -1.4], [0.0, 0.9], [-0.35, 0.55], [1.6, -1.2]], dtype=torch.float64)
    x = smooth_images(8, C, 24, 24)
    target = active_shift(x, true)
    layer = ActiveShift2d(C).double()
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    for _ in range(300):
        opt.zero_grad()
        loss = F.mse_loss(layer(x)[..., 4:-4, 4:-4], target[..., 4:-4, 4:-4])
        loss.backward()
        opt.step()
        sched.step()
    err = (layer.shift.detach() - true).abs().max().item()
    assert err < 0.05, f"learned shifts off by {err:.3f} px:\n{layer.shift.detach()}"


def test_default_init_uniform_and_learned():
    layer = ActiveShift2d(1000)
    assert isinstance(layer.shift, torch.nn.Parameter) and layer.learned
    assert layer.shift.shape == (1000, 2)
    assert layer.shift.min() >= -1 and layer.shift.max() <= 1 and layer.shift.std() > 0.5


@pytest.mark.parametrize("mode", ["SR", "SI", "GS"])
def test_fixed_variants_are_buffers_in_state_dict(mode):
    g = torch.Generator().manual_seed(3)
    layer = ActiveShift2d(20, mode=mode, generator=g)
    assert not layer.learned and list(layer.parameters()) == []
    assert "shift" in layer.state_dict()
    if mode in ("SI", "GS"):
        assert torch.equal(layer.shift, layer.shift.round())
    again = ActiveShift2d(20, mode=mode, generator=torch.Generator().manual_seed(3))
    assert torch.equal(layer.shift, again.shift)


def test_grouped_shift_assignment():
    s = grouped_shift(20)  # groups of floor(20 / 9) = 2 channels, 2 unshifted
    assert s[:2].tolist() == [[-1, -1], [-1, -1]]
    assert s[8:10].tolist() == [[0, 0], [0, 0]]
    assert s[16:18].tolist() == [[1, 1], [1, 1]]
    assert s[18:].abs().sum() == 0
    displacements = {tuple(v) for v in s[:18].tolist()}
    assert len(displacements) == 9


def test_bad_mode_and_channels():
    with pytest.raises(ValueError, match="shift_mode"):
        ActiveShift2d(4, mode="XX")
    with pytest.raises(ValueError, match="channels"):
        ActiveShift2d(0)


def test_normalized_gradient():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    normalize_shift_grad_([p])
    torch.testing.assert_close(p.grad, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]))


def small_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1, bias=False), torch.nn.BatchNorm2d(8), ActiveShift2d(8), torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )


def test_param_groups_and_step_hook():
    model = small_model()
    model(torch.randn(2, 3, 5, 5))
    groups = param_groups(model, lr=0.1, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["shift"]["lr"] == pytest.approx(0.001) and by_name["shift"]["weight_decay"] == 0
    assert by_name["shift"]["params"] == [model[2].shift]
    assert by_name["no_decay"]["weight_decay"] == 0
    assert any(p is model[1].weight for p in by_name["no_decay"]["params"])
    assert all(p.dim() > 1 for p in by_name["decay"]["params"])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))

    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.0)
    install_shift_grad_normalization(opt)
    before = model[2].shift.detach().clone()
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    step = (model[2].shift.detach() - before).norm(dim=1)
    # each channel moved by exactly lr * 0.01 (unit-norm gradient), or not at all
    assert torch.all((step - 0.001).abs() < 1e-6)
    assert [name for name, _ in shift_layers(model)] == ["2"]


def test_tn_learns_from_the_start_sr_holds():
    from asl_cli.nn import ActiveShift2d, param_groups, shift_layers
    from asl_cli.zoo import create_model

    sr = ActiveShift2d(8, mode="SR", generator=torch.Generator().manual_seed(3))
    tn = ActiveShift2d(8, mode="TN", generator=torch.Generator().manual_seed(3))
    assert torch.equal(sr.shift, tn.shift) and tn.learned and not sr.learned
    model = create_model("asnet20_16x1", shift_mode="TN", shift_seed=1)
    (group,) = [g for g in param_groups(model, 0.1, 5e-4) if g["name"] == "shift"]
    assert group["lr"] == 0.1 * 0.01 and group["normalize_grad"]
    assert {id(m.shift) for _, m in shift_layers(model)} == {id(p) for p in group["params"]}

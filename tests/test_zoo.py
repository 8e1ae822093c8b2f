"""The zoo reproduces the paper's parameter and MAC counts, and every model trains and compiles."""
import pytest
import torch

from asl_cli.nn import shift_layers
from asl_cli.zoo import PAPER, count_macs, count_parameters, create_model, get_entry, list_models

# The "computed" column of the reference table (authors' network definitions), in millions.
COMPUTED = {
    "asnet20_16x1": 0.0354,
    "asnet20_16x3": 0.0975,
    "asnet20_16x6": 0.1906,
    "asnet20_16x9": 0.2837,
    "asnet20_46x1": 0.2756,
    "asnet110_16x6": 1.2019,
    "asnet20_88x1": 0.9929,
    "as_resnet_w32": 0.9013,
    "as_resnet_w50": 1.9629,
    "as_resnet_w68": 3.4245,
}


@pytest.mark.parametrize("name", list(COMPUTED))
def test_parameter_counts_match_paper(name):
    n = count_parameters(create_model(name)) / 1e6
    assert abs(n - COMPUTED[name]) / COMPUTED[name] < 1e-3, n
    printed = PAPER[name]["params_m"]
    decimals = len(str(printed).split(".")[1])
    assert round(n, decimals) == printed, (n, printed)


def test_shiftresnet_count_matches_its_authors():
    assert count_parameters(create_model("shiftresnet20_x3")) == 95_642
    for name in list_models("shiftresnet"):
        n = count_parameters(create_model(name)) / 1e6
        printed = PAPER[name]["params_m"]
        assert round(n, len(str(printed).split(".")[1])) == printed, (name, n)


@pytest.mark.parametrize("name,paper,tol", [("as_resnet_w32", 171, 0.02), ("as_resnet_w50", 404, 0.02)])
def test_macs_match_paper(name, paper, tol):
    macs = count_macs(create_model(name), 224) / 1e6
    assert abs(macs - paper) / paper < tol, macs


def test_macs_w68_and_formula():
    # conv + FC MACs 726.9M plus 4 per ASL output element = 736.2M (paper prints 729M)
    macs = count_macs(create_model("as_resnet_w68"), 224) / 1e6
    assert abs(macs - 736.2) < 0.1


def test_fixed_shift_variants_count_the_same():
    tr = count_parameters(create_model("asnet20_16x1"))
    for mode in ("SR", "SI", "GS"):
        m = create_model("asnet20_16x1", shift_mode=mode)
        assert count_parameters(m) == tr
        assert all(not layer.learned for _, layer in shift_layers(m))


def test_fixed_shifts_are_seeded_and_saved():
    a = create_model("asnet20_16x1", shift_mode="SR", shift_seed=5)
    b = create_model("asnet20_16x1", shift_mode="SR", shift_seed=5)
    c = create_model("asnet20_16x1", shift_mode="SR", shift_seed=6)
    sa, sb, sc = (dict(shift_layers(m))["stage1.0.spatial"].shift for m in (a, b, c))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)
    assert "stage1.0.spatial.shift" in a.state_dict()
    c.load_state_dict(a.state_dict())
    assert torch.equal(dict(shift_layers(c))["stage1.0.spatial"].shift, sa)


@pytest.mark.parametrize("spatial", ["dw3_bn", "dw3"])
def test_table2_spatial_variants(spatial):
    m = create_model("asnet20_16x1", spatial=spatial)
    assert not list(shift_layers(m))
    assert any(isinstance(x, torch.nn.Conv2d) and x.groups > 1 for x in m.modules())
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_names_and_overrides():
    with pytest.raises(KeyError, match="did you mean"):
        create_model("asnet20_16x2")
    with pytest.raises(TypeError, match="num_classes"):
        create_model("asnet20_16x1", colour="blue")
    with pytest.raises(ValueError, match="spatial"):
        create_model("asnet20_16x1", spatial="dw5")
    with pytest.raises(ValueError, match="shift_mode"):
        create_model("as_resnet_w32", shift_mode="XX")


def test_width_override():
    m = create_model("as_resnet_w32", width=8, num_classes=7)
    assert m.fc.out_features == 7 and m.fc.in_features == 64


SMALL_INPUT = 64  # ImageNet models are checked at a reduced resolution to keep the suite fast


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_channels_last_and_state_dict(name):
    entry = get_entry(name)
    size = entry.input_size if entry.dataset == "cifar" else SMALL_INPUT
    overrides = {} if entry.family == "mobilenet_v2" else {"num_classes": 7}
    m = create_model(name, **overrides)
    x = torch.randn(2, 3, size, size)
    y = m(x)
    assert y.shape == (2, 7 if overrides else entry.default_classes)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    mc = create_model(name, **overrides).to(memory_format=torch.channels_last)
    mc.load_state_dict(m.state_dict())
    m.eval()
    mc.eval()
    torch.testing.assert_close(mc(x.contiguous(memory_format=torch.channels_last)), m(x), atol=1e-4, rtol=1e-4)


def test_default_classes():
    assert create_model("asnet20_16x1").fc.out_features == 10
    assert create_model("shiftresnet20_x1").fc.out_features == 10
    assert create_model("as_resnet_w32").fc.out_features == 1000
    assert create_model("mobilenet_v2_x0.5").classifier[-1].out_features == 1000


@pytest.mark.parametrize("name", ["asnet20_16x1", "asnet20_16x1:dw3_bn", "shiftresnet20_x1", "as_resnet_w32", "mobilenet_v2_x0.5"])
def test_torch_compile(name):
    """One model of each family (the family's code is shared across depths and widths)."""
    name, _, spatial = name.partition(":")
    entry = get_entry(name)
    size = entry.input_size if entry.dataset == "cifar" else SMALL_INPUT
    m = create_model(name, **({"spatial": spatial} if spatial else {})).eval()
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="aot_eager")(x), m(x), atol=1e-4, rtol=1e-4)

"""One invariant suite, parametrized over every member of the dropout family (dropout_lab.dropout).

Statistical checks use fixed seeds, >= 200k independent draws where a rate is measured, and a tolerance of
4 standard errors computed from the data (rates: sqrt(p(1-p)/n); means: sample std / sqrt(n) over
independent replicates).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropout_lab.activations import (
    GaussianNoiseReLU,
    RandomizedLeakyReLU,
    StochasticReLU,
    gaussian_noise_relu,
    make_stochastic_activation,
    stochastic_relu,
)
from dropout_lab.dropconnect import DropConnectLinear, dropconnect_linear
from dropout_lab.dropout import (
    ChannelDropout,
    Dropout,
    Dropout2d,
    GaussianDropout,
    ScratchDropout,
    StochasticModule,
    _ScratchDropoutFunction,
    channel_dropout,
    check_probability,
    gaussian_dropout,
    keep_multiplier,
    mask_dtype,
    scratch_dropout,
    set_mc,
    stochastic_modules,
)

LEVEL = 0.3  # default noise level (p, sigma, or rrelu slope width) used by the suite
NAN, INF = math.nan, math.inf
P_BAD = (-0.1, 1.0, 1.5, NAN, INF)
LOWER = 1.0 / 8.0


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(20240611)


# ------------------------------------------------------------------------------------------ the variant specs
def _identity(m: StochasticModule, x: Tensor) -> Tensor:
    return x


def _relu(m: StochasticModule, x: Tensor) -> Tensor:
    return F.relu(x)


def _rrelu_mean(m: RandomizedLeakyReLU, x: Tensor) -> Tensor:
    return torch.where(x >= 0, x, x * ((m.lower + m.upper) / 2))


def _gaussian_relu_mean(m: GaussianNoiseReLU, x: Tensor) -> Tensor:
    """E relu(x + s eps) = x Phi(x/s) + s phi(x/s), written with erf (not the module's ndtr)."""
    if m.sigma == 0:
        return F.relu(x)
    z = x.double() / m.sigma
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return (x.double() * cdf + m.sigma * pdf).to(x.dtype)


def _linear(m: DropConnectLinear, x: Tensor) -> Tensor:
    return F.linear(x, m.weight, m.bias)


def _kept_grad(x: Tensor, out: Tensor, p: float) -> Tensor:
    """d out / d x for inverted dropout: the keep mask, recovered from out != 0, over 1 - p."""
    return (out != 0).to(x.dtype) / (1 - p)


def _ratio_grad(x: Tensor, out: Tensor, p: float) -> Tensor:
    """d out / d x for out = x * noise (noise independent of x): out / x."""
    return out / x


def _relu_noise_grad(x: Tensor, out: Tensor, p: float) -> Tensor:
    return (out > 0).to(x.dtype)


def _p_repr(level: float) -> str:
    return f"p={level}"


def _twin(fn: Callable[[Tensor, float, bool], Tensor]) -> Callable[[StochasticModule, Tensor, bool], Tensor]:
    """The functional twin ``fn(x, p, training)`` called with the module's p."""
    return lambda m, x, training: fn(x, m.p, training)


@dataclass(frozen=True)
class Spec:
    """One variant and what the suite may assume about it."""

    make: Callable[[float], StochasticModule]  # noise level -> module; level 0 means no noise
    fn: Callable[[StochasticModule, Tensor, bool], Tensor]  # the functional twin, with the module's settings
    grad_rule: Callable[[Tensor, Tensor, float], Tensor] | None  # elementwise d out/d x; None: DropConnect
    shape: tuple[int, ...] = (100,)  # one sample's input shape (the tests add the batch dimension)
    points: tuple[int, ...] = (8,)  # a small input shape for per-point checks (<= 10 outputs)
    eval_fn: Callable[..., Tensor] = _identity  # the deterministic (eval) output, in closed form
    repr_text: Callable[[float], str] = _p_repr  # what repr shows for a noise level
    unit: str | None = None  # what a drop zeroes: "element", "channel", "weight"; None: nothing exactly
    bad_levels: tuple[float, ...] = P_BAD
    error_match: str = r"\bp\b"
    multiplicative: bool = False  # out = x * noise with E noise = 1, Var noise = p / (1 - p)
    loop: bool = False  # one mask per forward: independent replicates need one forward each


ELEMENTS = {"unit": "element", "multiplicative": True}
CHANNELS = {"shape": (4, 5, 5), "points": (4, 1, 2), "unit": "channel", "multiplicative": True}
NO_P = {"bad_levels": (-0.1, NAN, INF)}


def _uniform_mask_dropout(p: float) -> Dropout:
    """``Dropout`` as ``dropout_lab.speed.UniformDropoutMasks`` leaves it."""
    layer = Dropout(p)
    layer.uniform_masks = True
    return layer


SPECS = {
    "scratch_dropout": Spec(ScratchDropout, _twin(scratch_dropout), _kept_grad, **ELEMENTS),
    "dropout": Spec(Dropout, _twin(F.dropout), _kept_grad, **ELEMENTS),
    "dropout_uniform_masks": Spec(_uniform_mask_dropout, _twin(scratch_dropout), _kept_grad, **ELEMENTS),
    "dropout2d": Spec(Dropout2d, _twin(F.dropout2d), _kept_grad, **CHANNELS),
    "channel_dropout": Spec(ChannelDropout, _twin(channel_dropout), _kept_grad, **CHANNELS),
    "gaussian_dropout": Spec(GaussianDropout, _twin(gaussian_dropout), _ratio_grad, multiplicative=True),
    "dropconnect": Spec(
        lambda p: DropConnectLinear(20, 10, p),
        lambda m, x, t: dropconnect_linear(x, m.weight, m.bias, m.p, t),
        None,
        shape=(20,),
        points=(20,),
        eval_fn=_linear,
        repr_text=lambda p: f"in_features=20, out_features=10, bias=True, p={p}, per_sample=False",
        unit="weight",
        loop=True,
    ),
    "dropconnect_per_sample": Spec(
        lambda p: DropConnectLinear(20, 10, p, per_sample=True),
        lambda m, x, t: dropconnect_linear(x, m.weight, m.bias, m.p, t, per_sample=True),
        None,
        shape=(20,),
        points=(20,),
        eval_fn=_linear,
        repr_text=lambda p: f"p={p}, per_sample=True",
        unit="weight",
    ),
    "stochastic_relu": Spec(
        StochasticReLU,
        _twin(stochastic_relu),
        _kept_grad,
        eval_fn=_relu,
        unit="element",
    ),
    "rrelu": Spec(  # noise level = slope width: U(1/8, 1/8 + level)
        lambda w: RandomizedLeakyReLU(LOWER, LOWER + w),
        lambda m, x, t: F.rrelu(x, m.lower, m.upper, t),
        _ratio_grad,
        eval_fn=_rrelu_mean,
        repr_text=lambda w: f"lower={LOWER}, upper={LOWER + w}",
        error_match="upper",
        **NO_P,
    ),
    "gaussian_relu": Spec(  # noise level = sigma
        GaussianNoiseReLU,
        lambda m, x, t: gaussian_noise_relu(x, m.sigma, t),
        _relu_noise_grad,
        eval_fn=_gaussian_relu_mean,
        repr_text=lambda s: f"sigma={s}",
        error_match="sigma",
        **NO_P,
    ),
}


def _params(keep: Callable[[Spec], bool] = lambda s: True) -> list:
    return [pytest.param(spec, id=name) for name, spec in SPECS.items() if keep(spec)]


ALL = _params()


def _draw(spec: Spec, m: StochasticModule, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Training outputs for a batch of replicates x (R, *shape), and the DropConnect masks (R, out, in)."""
    if spec.loop:
        outs, masks = zip(*[(m(row[None])[0], m.last_mask) for row in x], strict=True)
        return torch.stack(outs), torch.stack(masks)
    return m(x), getattr(m, "last_mask", None)


def _assert_within_4se(estimate: Tensor, target: Tensor, se: Tensor | float, atol: float = 1e-5) -> None:
    se = torch.as_tensor(se, dtype=estimate.dtype)
    err = (estimate - target).abs()
    bad = err > 4 * se + atol
    worst = int((err - 4 * se).argmax())
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} beyond 4 SE; worst: estimate {estimate.flatten()[worst]:.6g}, "
        f"target {target.flatten()[worst]:.6g}, SE {se.expand_as(err).flatten()[worst]:.3g}"
    )


# ------------------------------------------------------------------------------------------ the invariants
@pytest.mark.parametrize("spec", ALL)
def test_eval_is_the_deterministic_closed_form(spec: Spec) -> None:
    m = spec.make(LEVEL).eval()
    x = torch.randn(64, *spec.shape) * 2
    out = m(x)
    torch.testing.assert_close(out, spec.eval_fn(m, x), rtol=1e-5, atol=1e-6)
    assert torch.equal(m(x), out) and not m.stochastic
    if spec.eval_fn is _identity:
        assert out is x  # returns early, no copy


@pytest.mark.parametrize("spec", ALL)
def test_eval_output_is_the_monte_carlo_mean_of_training_outputs(spec: Spec) -> None:
    """Per point: the mean of 20k training outputs is within 4 SE of the eval output, at <= 10 points.

    Points lie in [-1, 1] and sigma = 0.5, so gaussian_relu's P(out > 0) >= 2% at every point and its sample
    SE is a fair estimate (at rarer points all draws can be 0, and the sample SE with them).
    """
    m = spec.make(0.5)
    x0 = torch.linspace(-1, 1, math.prod(spec.points)).reshape(spec.points)
    n_draws = 1000 if spec.loop else 20_000
    out, _ = _draw(spec, m.train(), x0.expand(n_draws, *spec.points).contiguous())
    expected = m.eval()(x0[None])[0]
    _assert_within_4se(out.mean(0), expected, out.std(0) / math.sqrt(out.shape[0]))


@pytest.mark.parametrize("spec", ALL)
def test_training_mean_is_preserved(spec: Spec) -> None:
    """Mean of (training output - eval output) is 0 within 4 SE, with SE over independent replicates."""
    m = spec.make(LEVEL)
    x = torch.randn(1000 if spec.loop else 2000, *spec.shape) + 0.5
    out, _ = _draw(spec, m.train(), x)
    diff = (out - m.eval()(x)).flatten(1).mean(1)  # one value per independent replicate
    _assert_within_4se(diff.mean(), torch.tensor(0.0), diff.std() / math.sqrt(diff.numel()), atol=0)


@pytest.mark.parametrize("spec", ALL)
def test_zero_noise_level_is_deterministic_in_training(spec: Spec) -> None:
    m = spec.make(0.0).train()
    x = torch.randn(32, *spec.shape)
    assert not m.stochastic
    out = m(x)
    assert torch.equal(out, spec.eval_fn(m, x))
    if spec.eval_fn is _identity:
        assert out is x


@pytest.mark.parametrize("p", [0.3, 0.7])  # a randn-based mask would drop Phi(p), not p
@pytest.mark.parametrize("spec", _params(lambda s: s.unit is not None))
def test_drop_rate_is_p(spec: Spec, p: float) -> None:
    m = spec.make(p).train()
    if spec.unit == "weight":
        _, masks = _draw(spec, m, torch.randn(1000, *spec.shape))
        dropped = ~masks  # 1000 x 10 x 20 = 200k weights
    else:
        dropped = _dropped_units(spec, m, 200_000, torch.float32)
    n = dropped.numel()
    assert n >= 200_000
    _assert_within_4se(dropped.double().mean(), torch.tensor(p).double(), math.sqrt(p * (1 - p) / n), atol=0)


def _dropped_units(spec: Spec, m: StochasticModule, units: int, dtype: torch.dtype) -> Tensor:
    """Which of about ``units`` elements (or channels) of a positive input of ``dtype`` the layer zeroed."""
    units_per_sample = math.prod(spec.points) if spec.unit == "element" else spec.points[0]
    zero = m((torch.rand(units // units_per_sample, *spec.points) + 0.1).to(dtype)) == 0
    if spec.unit == "channel":  # whole channels go: each is all zeros or none
        zero = zero.flatten(2)
        assert torch.equal(zero.all(-1), zero.any(-1))
        zero = zero[..., 0]
    return zero


@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("spec", _params(lambda s: s.unit in ("element", "channel")))
def test_drop_rate_is_p_in_bfloat16(spec: Spec, p: float) -> None:
    """Under bf16 autocast the layers get bf16 activations; uniforms drawn in bf16 would keep 0.496 at p = 0.5
    (bf16 has 8 significant bits), so the masks are drawn in float32. 1M draws: SE 0.0005."""
    dropped = _dropped_units(spec, spec.make(p).train(), 1_000_000, torch.bfloat16)
    n = dropped.numel()
    assert n >= 1_000_000
    _assert_within_4se(dropped.double().mean(), torch.tensor(p).double(), math.sqrt(p * (1 - p) / n), atol=0)


@pytest.mark.parametrize("spec", _params(lambda s: s.multiplicative))
def test_multiplicative_noise_has_mean_one_and_variance_p_over_1_minus_p(spec: Spec) -> None:
    """Srivastava et al. §10: Bernoulli and Gaussian dropout share E = 1 and Var = p / (1 - p)."""
    m = spec.make(LEVEL).train()
    n_samples = 200_000 // (spec.points[0] if spec.unit == "channel" else math.prod(spec.points))
    noise = m(torch.ones(n_samples, *spec.points))
    if spec.unit == "channel":
        noise = noise[..., 0, 0]  # one independent draw per (sample, channel)
    noise = noise.double().flatten()
    n = noise.numel()
    _assert_within_4se(noise.mean(), torch.tensor(1.0).double(), noise.std() / math.sqrt(n), atol=0)
    sq = (noise - noise.mean()) ** 2
    target = torch.tensor(LEVEL / (1 - LEVEL)).double()
    _assert_within_4se(sq.mean(), target, sq.std() / math.sqrt(n), atol=0)


@pytest.mark.parametrize("spec", ALL)
def test_backward_uses_the_forward_noise(spec: Spec) -> None:
    m = spec.make(LEVEL).train()
    x = torch.randn(256, *spec.shape, requires_grad=True)
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    if spec.grad_rule is not None:
        torch.testing.assert_close(x.grad, g * spec.grad_rule(x.detach(), out.detach(), LEVEL))
        if spec.grad_rule is _kept_grad and spec.multiplicative:  # both readings of the mask agree
            torch.testing.assert_close(x.grad, g * _ratio_grad(x.detach(), out.detach(), LEVEL))
        return
    # DropConnect: dL/dx = g (mask * W / (1 - p)) and dL/dW = mask / (1 - p) * (g^T x), with the stored mask
    kept = m.last_mask * m.weight.detach() / (1 - LEVEL)
    if m.per_sample:
        torch.testing.assert_close(x.grad, torch.einsum("bo,boi->bi", g, kept))
        w_grad = torch.einsum("bo,boi,bi->oi", g, m.last_mask / (1 - LEVEL), x.detach())
    else:
        torch.testing.assert_close(x.grad, g @ kept)
        w_grad = m.last_mask / (1 - LEVEL) * (g.T @ x.detach())
    torch.testing.assert_close(m.weight.grad, w_grad)
    torch.testing.assert_close(m.bias.grad, g.sum(0))  # the bias is never masked


@pytest.mark.parametrize("spec", ALL)
def test_bad_noise_level_is_rejected_naming_it(spec: Spec) -> None:
    for bad in spec.bad_levels:
        with pytest.raises(ValueError, match=spec.error_match):
            spec.make(bad)


@pytest.mark.parametrize("spec", ALL)
def test_repr_shows_the_noise_level(spec: Spec) -> None:
    m = spec.make(LEVEL)
    assert spec.repr_text(LEVEL) in repr(m)
    assert spec.repr_text(LEVEL) in str(nn.Sequential(m))
    m.mc = True
    assert "mc=True" in repr(m)


@pytest.mark.parametrize("spec", ALL)
def test_mc_mode_keeps_the_layer_stochastic_in_eval(spec: Spec) -> None:
    m = spec.make(0.5).eval()
    x = torch.randn(16, *spec.shape)
    assert torch.equal(m(x), m(x))
    m.mc = True
    assert m.stochastic and not m.training
    assert not torch.equal(m(x), m(x))
    quiet = spec.make(0.0).eval()
    quiet.mc = True
    assert not quiet.stochastic and torch.equal(quiet(x), quiet(x))


@pytest.mark.parametrize("spec", ALL)
def test_function_twin_matches_the_module(spec: Spec) -> None:
    m = spec.make(LEVEL).train()
    x = torch.randn(32, *spec.shape)
    torch.manual_seed(7)
    out = m(x)
    torch.manual_seed(7)
    assert torch.equal(spec.fn(m, x, True), out)
    assert torch.equal(spec.fn(m, x, False), m.eval()(x))


@pytest.mark.parametrize("spec", ALL)
def test_output_keeps_dtype(spec: Spec) -> None:
    m = spec.make(LEVEL).double().train()
    x = torch.randn(8, *spec.shape, dtype=torch.float64)
    assert m(x).dtype == torch.float64
    assert m.eval()(x).dtype == torch.float64


def test_set_mc_finds_every_variant() -> None:
    layers = [spec.make(LEVEL) for spec in SPECS.values()]
    inner = nn.Sequential(*layers[:5], nn.ReLU())
    model = nn.Sequential(nn.Linear(3, 3), inner, *layers[5:], nn.Dropout(0.1))
    found = set_mc(model, True)
    assert [id(m) for m in found] == [id(m) for m in layers]
    assert all(m.mc for m in layers)
    assert [name for name, _ in stochastic_modules(model)] == [f"1.{i}" for i in range(5)] + [
        str(i) for i in range(2, 2 + len(layers) - 5)
    ]
    assert set_mc(model, False) == found and not any(m.mc for m in layers)


# ------------------------------------------------------------------------------------------ variant specifics
def test_scratch_backward_reuses_the_exact_forward_mask() -> None:
    x = torch.randn(1000, requires_grad=True)
    p = 0.4
    torch.manual_seed(3)
    mask = torch.rand_like(x) > p  # what the forward draws
    torch.manual_seed(3)
    out = scratch_dropout(x, p)
    assert type(out.grad_fn).__name__ == f"{_ScratchDropoutFunction.__name__}Backward"
    (saved,) = out.grad_fn.saved_tensors  # the keep mask, stored scaled: 1 / (1 - p) where kept, else 0
    assert torch.equal(saved, mask * (1 / (1 - p)))
    assert torch.equal(out, x.detach() * mask * (1 / (1 - p)))
    g = torch.randn_like(x)
    out.backward(g)
    assert torch.equal(x.grad, g * mask * (1 / (1 - p)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["scratch", "channel"])
def test_scaled_keep_mask_equals_the_boolean_formula(op: str, dtype: torch.dtype) -> None:
    """``x * keep_multiplier(u, p)`` is ``x * (u > p) * (1 / (1 - p))`` bit for bit, forward and backward."""
    fn = scratch_dropout if op == "scratch" else channel_dropout
    x = (torch.randn(16, 6, 5, 5) * 3).to(dtype).requires_grad_()
    g = torch.randn(x.shape).to(dtype)
    mask_shape = x.shape if op == "scratch" else (*x.shape[:2], 1, 1)
    for p in (0.1, 0.3, 0.5, 0.7, 0.9):
        torch.manual_seed(5)
        u = torch.rand(mask_shape, dtype=mask_dtype(x))  # the draws the op makes
        ref = x.detach() * (u > p) * (1.0 / (1.0 - p))
        assert torch.equal(keep_multiplier(u.clone(), p), (u > p).to(u.dtype) * (1.0 / (1.0 - p)))
        torch.manual_seed(5)
        out = fn(x, p)
        assert out.dtype == dtype and torch.equal(out, ref), (p, (out - ref).abs().max())
        x.grad = None
        out.backward(g)
        assert torch.equal(x.grad, g * (u > p) * (1.0 / (1.0 - p))), p
    u = torch.zeros(4)
    assert torch.equal(keep_multiplier(u.clone(), 0.0, inclusive=True), torch.ones(4))  # p = 0 keeps u == 0
    assert torch.equal(keep_multiplier(u.clone(), 0.0), torch.zeros(4))


def test_scratch_dropout_p_one_gives_zeros() -> None:
    x = torch.randn(4, 7)
    out = scratch_dropout(x, 1.0)
    assert torch.equal(out, torch.zeros_like(x))
    assert scratch_dropout(x, 1.0, training=False) is x
    with pytest.raises(ValueError, match=r"\bp\b"):
        ScratchDropout(1.0)


@pytest.mark.parametrize(
    ("fn", "bad"),
    [
        pytest.param(lambda p: scratch_dropout(torch.ones(3), p), (-0.1, 1.5, NAN, INF), id="scratch"),
        pytest.param(lambda p: channel_dropout(torch.ones(2, 3, 4), p), P_BAD, id="channel_dropout"),
        pytest.param(lambda p: gaussian_dropout(torch.ones(3), p), P_BAD, id="gaussian_dropout"),
        pytest.param(lambda p: stochastic_relu(torch.ones(3), p), P_BAD, id="stochastic_relu"),
        pytest.param(lambda p: dropconnect_linear(torch.ones(1, 3), torch.ones(2, 3), p=p), P_BAD, id="dc"),
    ],
)
def test_functions_reject_bad_p(fn: Callable[[float], Tensor], bad: tuple[float, ...]) -> None:
    for p in bad:
        with pytest.raises(ValueError, match=r"\bp\b"):
            fn(p)


def test_check_probability() -> None:
    assert check_probability(0) == 0.0 and isinstance(check_probability(0), float)
    assert check_probability(1, allow_one=True) == 1.0
    with pytest.raises(ValueError, match=r"^p must satisfy 0 <= p < 1, got 1.5$"):
        check_probability(1.5)
    with pytest.raises(ValueError, match=r"^model\.p must satisfy 0 <= model\.p < 1, got nan$"):
        check_probability(NAN, "model.p")
    with pytest.raises(ValueError, match=r"got 0\.5"):
        check_probability("0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise_relu(torch.ones(2), -1.0)


def test_dropconnect_is_a_standard_linear_with_unmasked_bias() -> None:
    torch.manual_seed(0)
    ref = nn.Linear(20, 10)
    torch.manual_seed(0)
    m = DropConnectLinear(20, 10, p=0.5)
    assert isinstance(m, nn.Linear) and isinstance(m, StochasticModule)
    assert m.state_dict().keys() == ref.state_dict().keys()
    assert torch.equal(m.weight, ref.weight) and torch.equal(m.bias, ref.bias)
    x = torch.randn(8, 20)
    assert torch.equal(m.eval()(x), F.linear(x, m.weight, m.bias)) and m.last_mask is None
    with torch.no_grad():
        m.weight.zero_()
    assert torch.equal(m.train()(x), m.bias.expand(8, 10))  # only weights are dropped
    assert DropConnectLinear(20, 10, bias=False).train()(x).shape == (8, 10)


@pytest.mark.parametrize("per_sample", [False, True])
def test_dropconnect_mask_per_batch_or_per_row(per_sample: bool) -> None:
    m = DropConnectLinear(20, 10, p=0.5, per_sample=per_sample).train()
    out = m(torch.ones(64, 20))
    rows_differ = not torch.equal(out, out[:1].expand_as(out))
    assert rows_differ == per_sample
    assert m.last_mask.shape == ((64, 10, 20) if per_sample else (10, 20))
    assert m.last_mask.dtype == torch.bool
    assert m(torch.ones(2, 3, 20)).shape == (2, 3, 10)  # any leading dims


def test_make_stochastic_activation() -> None:
    sr, gr, rr = (make_stochastic_activation(n, 0.2) for n in ("stochastic_relu", "gaussian_relu", "rrelu"))
    assert isinstance(sr, StochasticReLU) and sr.p == 0.2
    assert isinstance(gr, GaussianNoiseReLU) and gr.sigma == 0.2
    assert isinstance(rr, RandomizedLeakyReLU) and (rr.lower, rr.upper) == (1 / 8, 1 / 3) and rr.p == 0.0
    with pytest.raises(ValueError, match="unknown stochastic activation"):
        make_stochastic_activation("swish", 0.2)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ALL)
def test_cuda_noise_is_drawn_on_device_without_host_syncs(spec: Spec) -> None:
    m = spec.make(LEVEL).cuda().train()
    dtype = torch.float32 if spec.unit == "weight" else torch.float16
    x = torch.randn(64, *spec.shape, device="cuda", dtype=dtype)
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside a forward raises
    try:
        out = m(x)
        m.eval()
        m.mc = True
        out_mc = m(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == out_mc.device == x.device
    assert out.dtype == out_mc.dtype == dtype
    if isinstance(m, DropConnectLinear):
        assert m.last_mask is not None and m.last_mask.device == x.device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", [Dropout, Dropout2d], ids=["Dropout", "Dropout2d"])
def test_kept_units_are_scaled_by_the_exact_inverse_keep_rate(layer: type[nn.Module], dtype: torch.dtype) -> None:
    """Each kept unit is ``x`` times the float32 ``1 / (1 − p)``, rounded to ``x``'s dtype; the drop rate is ``p``.

    PyTorch's CPU ``F.dropout`` and ``F.dropout2d`` round the scale itself to a half input's dtype first
    (1.0546875 for p = 0.05 in bf16: every kept unit 0.18 % high); the layers keep it in float32.
    """
    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.3, 0.5):
        x = (torch.rand(256, 64, 8, 8) + 0.5).to(dtype)  # 256 × 64 channels, 1M elements in [0.5, 1.5)
        out = layer(p).train()(x)
        assert out.dtype == dtype
        kept = out != 0
        scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)  # the float32 scale, as for float32 input
        assert torch.equal(out[kept], (x[kept].float() * scale).to(dtype)), p
        n = x.numel() if layer is Dropout else 256 * 64  # independent draws: elements, or channels
        dropped = 1.0 - kept.sum().item() / x.numel()
        assert abs(dropped - p) <= 4 * math.sqrt(p * (1 - p) / n), (p, dropped)


def test_rrelu_runs_in_fp16_on_the_cpu() -> None:
    """PyTorch has no fp16 CPU ``rrelu``: the layer computes in float32 and returns fp16, slopes in range."""
    torch.manual_seed(0)
    layer = RandomizedLeakyReLU(1 / 8, 1 / 3)
    x = (-torch.rand(64, 256) - 0.5).half().requires_grad_()  # all negative: every unit gets a random slope
    out = layer.train()(x)
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == torch.float16
    slopes = out.detach().float() / x.detach().float()
    assert slopes.min() >= 1 / 8 - 1e-3 and slopes.max() <= 1 / 3 + 1e-3
    assert abs(slopes.mean().item() - (1 / 8 + 1 / 3) / 2) < 4 * (1 / 3 - 1 / 8) / math.sqrt(12 * slopes.numel())
    evaluated = layer.eval()(x.detach())
    assert torch.equal(evaluated, (x.detach().float() * ((1 / 8 + 1 / 3) / 2)).half())

"""MC dropout: the vectorized passes against the Python loop, mode restoration, summaries, calibration, figures."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import lightning as L
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_calibration_error

from dropout_lab import mc_passes, mc_results
from dropout_lab.calibration import calibration_metrics, reliability_bins
from dropout_lab.dropconnect import DropConnectLinear
from dropout_lab.dropout import Dropout, StochasticModule, stochastic_modules
from dropout_lab.models import (
    DropConnectMLP,
    DropoutMLP,
    GaussianDropoutMLP,
    LeNet,
    ScratchDropoutMLP,
    StochasticActivationMLP,
)
from dropout_lab.plots import plot_reliability, plot_rotated, plot_summaries_vs_T
from dropout_lab.population import PopulationMLP
from dropout_lab.regression import MCDropoutRegressor, mc_moments
from dropout_lab.rotated import rotated_image_experiment, rotated_table
from dropout_lab.uncertainty import (
    MCResult,
    deterministic_predict,
    first_noise_layer,
    mc_loop_predict,
    mc_mode,
    mc_predict,
    summaries_vs_T,
    summarize_logits,
)

SMALL = [16, 12]
MODELS: dict[str, Callable[[], nn.Module]] = {
    "dropout": lambda: DropoutMLP(hidden_sizes=SMALL, dropouts=[0.5, 0.3], input_dropout=0.2),
    "scratch": lambda: ScratchDropoutMLP(hidden_sizes=SMALL, dropouts=[0.5, 0.5]),
    "gaussian": lambda: GaussianDropoutMLP(hidden_sizes=SMALL, dropouts=[0.5, 0.5]),
    "dropconnect": lambda: DropConnectMLP(hidden_sizes=SMALL, dropouts=[0.5, 0.5]),
    "dropconnect_per_sample": lambda: DropConnectMLP(hidden_sizes=SMALL, dropouts=[0.5, 0.5], per_sample=True),
    "stochastic_relu": lambda: StochasticActivationMLP(hidden_sizes=SMALL, activation="stochastic_relu"),
    "rrelu": lambda: StochasticActivationMLP(hidden_sizes=SMALL, activation="rrelu"),
    "gaussian_relu": lambda: StochasticActivationMLP(hidden_sizes=SMALL, activation="gaussian_relu"),
    "lenet": lambda: LeNet(channels=(4, 6), hidden=16),
    "lenet_scratch": lambda: LeNet(channels=(4, 6), hidden=16, scratch_channel_dropout=True),
    "lenet_dropout2d_only": lambda: LeNet(conv_dropouts=(0.5, 0.5), dense_dropout=0.0, channels=(4, 6), hidden=16),
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster, and on a busy machine threads spin-wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]()
    for m in model.modules():  # sharper logits than the default init, so the passes spread visibly
        if isinstance(m, nn.Linear) and m.out_features == 10:
            m.weight.data.mul_(8)
    return model


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def state(module: nn.Module) -> list[tuple]:
    """Every submodule's mode and every noise layer's flags."""
    out: list[tuple] = [(name, m.training) for name, m in module.named_modules()]
    out += [(name, m.mc) for name, m in stochastic_modules(module)]
    out += [(n, m.per_sample, id(m.last_mask)) for n, m in module.named_modules() if isinstance(m, DropConnectLinear)]
    return out


def distinct_passes(samples: torch.Tensor) -> int:
    """How many of the T passes (T, N, C) differ from each other."""
    return len({tuple(p.flatten().tolist()) for p in samples})


def check_invariants(r: MCResult) -> None:
    assert torch.allclose(r.mean_probs.sum(-1), r.mean_probs.new_ones(len(r.mean_probs)), atol=1e-5)
    if r.probs is not None:
        assert torch.allclose(r.probs.sum(-1), r.probs.new_ones(r.probs.shape[:2]), atol=1e-5)
    assert (r.predictive_entropy >= 0).all() and (r.expected_entropy >= 0).all()
    assert (r.mutual_information >= 0).all()
    assert (r.mutual_information <= r.predictive_entropy + 1e-6).all()
    assert (r.predictive_entropy <= math.log(r.mean_probs.shape[-1]) + 1e-5).all()
    assert (r.variance >= 0).all()


# ---------------------------------------------------------------------------------------------- vectorized vs loop
@pytest.mark.parametrize("chunk", [None, 2], ids=["whole-passes", "input-slices"])
@pytest.mark.parametrize("name", ["dropout", "scratch", "dropconnect", "lenet_dropout2d_only"])
def test_vectorized_matches_loop_statistically(name: str, chunk: int | None) -> None:
    model, x, T = make(name), images(3), 2000
    torch.manual_seed(0)
    vec = mc_predict(model, x, T, chunk_size=chunk, return_samples=True)
    loop = mc_loop_predict(model, x, T, return_samples=True)
    assert vec.probs is not None and loop.probs is not None
    for r in (vec, loop):
        check_invariants(r)
        assert r.T == T and r.probs.shape == (T, 3, 10)
    # means of T independent passes: their difference is within a few standard errors
    se = ((vec.variance + loop.variance) / T).sqrt()
    assert ((vec.mean_probs - loop.mean_probs).abs() <= 5 * se + 1e-6).all()
    assert vec.mean_probs.sub(loop.mean_probs).abs().max() > 0  # independent draws, not the same numbers
    pass_entropy = [-(r.probs * r.probs.clamp_min(1e-30).log()).sum(-1) for r in (vec, loop)]
    se_h = ((pass_entropy[0].var(0) + pass_entropy[1].var(0)) / T).sqrt()
    assert ((vec.expected_entropy - loop.expected_entropy).abs() <= 5 * se_h + 1e-6).all()
    assert torch.allclose(vec.variance, loop.variance, rtol=0.2, atol=1e-6)
    assert torch.allclose(vec.mutual_information, loop.mutual_information, rtol=0.2, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["dropout", "dropconnect", "lenet"])
def test_vectorized_matches_loop_on_cuda(name: str) -> None:
    model, x, T = make(name).cuda(), images(3), 2000
    vec, loop = mc_predict(model, x, T), mc_loop_predict(model, x, T)
    assert vec.mean_probs.device.type == "cuda"
    check_invariants(vec)
    se = ((vec.variance + loop.variance) / T).sqrt()
    assert ((vec.mean_probs - loop.mean_probs).abs() <= 5 * se + 1e-6).all()


@pytest.mark.parametrize("flush", [None, 25])
def test_streamed_summaries_equal_the_direct_ones_from_the_samples(flush: int | None, monkeypatch) -> None:
    if flush is not None:  # reduce the buffered logits every few blocks, not once at the end
        monkeypatch.setattr(mc_results, "_FLUSH_ELEMENTS", flush)
    model, x = make("dropout"), images(5)
    for chunk in (None, 7, 3):  # whole passes per forward, and slices of one pass per forward
        r = mc_predict(model, x, 50, chunk_size=chunk, return_samples=True)
        assert r.logits is not None
        ref = summarize_logits(r.logits)
        for field in ("mean_probs", "mean_logits", "predictive_entropy", "expected_entropy", "variance"):
            assert torch.allclose(getattr(r, field), getattr(ref, field), atol=1e-6), field
        assert torch.allclose(r.mutual_information, ref.mutual_information, atol=1e-6)
        assert torch.allclose(r.probs, r.logits.softmax(-1))


def test_streamed_variance_and_mutual_information_hold_for_confident_inputs() -> None:
    """p ≈ 0.9998 on every input (as a trained net has on most test images): variances of about 1e-11 and
    mutual informations of about 1e-7 lie far below float32's resolution of p; the streamed summaries must still
    match the float64 ones from the same logits (they came out 0 or off by up to 4·10⁴× when formed in float32)."""
    torch.manual_seed(0)
    model = DropoutMLP(hidden_sizes=[64, 64], dropouts=[0.05, 0.05])
    with torch.no_grad():
        model.net[-1].bias[0] += 11.0  # one class wins by a wide margin
    r = mc_predict(model, torch.rand(200, 1, 28, 28), 200, return_samples=True)
    ref = summarize_logits(r.logits)
    assert (ref.mean_probs[:, 0] > 0.999).all()
    top, top_ref = r.variance[:, 0].double(), ref.variance[:, 0].double()
    assert (top_ref > 0).all() and (top_ref < 1e-9).all()
    torch.testing.assert_close(top, top_ref, rtol=1e-2, atol=0)
    mi, mi_ref = r.mutual_information.double(), ref.mutual_information.double()
    assert (mi_ref > 0).all()
    torch.testing.assert_close(mi, mi_ref, rtol=1e-3, atol=0)


def test_tiny_chunks_agree_with_one_chunk() -> None:
    model, x, T = make("dropout"), images(4), 600
    torch.manual_seed(0)
    whole = mc_predict(model, x, T)
    tiny = mc_predict(model, x, T, chunk_size=3)  # smaller than the batch: one slice of one pass per forward
    mid = mc_predict(model, x, T, chunk_size=10)  # two whole passes per forward, a remainder at the end
    for r in (tiny, mid):
        assert r.mean_probs.shape == (4, 10) and r.probs is None and r.logits is None
        se = ((whole.variance + r.variance) / T).sqrt()
        assert ((whole.mean_probs - r.mean_probs).abs() <= 5 * se + 1e-6).all()
    # no noise: every chunking gives the same numbers
    quiet = DropoutMLP(hidden_sizes=SMALL, dropouts=[0.0, 0.0])
    a, b = mc_predict(quiet, x, 7), mc_predict(quiet, x, 7, chunk_size=3)
    assert torch.allclose(a.mean_probs, b.mean_probs, atol=1e-6)


def test_memory_budget_limits_rows_per_forward() -> None:
    model, x = make("dropconnect"), images(4)
    rows: list[int] = []
    model.net[-1].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    # 784x16 DropConnect masks per row: a budget of 3 rows' worth of masks means <= 3 rows per forward
    budget = 3 * (3 * 784 * 16 + 784 + 16)
    mc_predict(model, x, 5, memory_budget=budget, share_prefix=False)
    assert max(rows[1:]) <= 3 and sum(rows[1:]) == 4 * 5  # rows[0] is the one-row probe
    rows.clear()
    mc_predict(model, x, 5, memory_budget=budget)  # the sharing check's forwards stay within the limit too
    assert max(rows) <= 3
    rows.clear()
    mc_predict(model, x, 5, max_rows=8)
    assert max(rows) <= 8


# ---------------------------------------------------------------------------------------------- shared prefix
def same_draws(model: nn.Module, x: torch.Tensor, T: int, chunk_size: int | None = None) -> list[torch.Tensor]:
    """The per-pass logits of ``mc_predict`` with and without ``share_prefix``, from seed 0 each."""
    samples = []
    for share in (True, False):
        torch.manual_seed(0)
        r = mc_predict(model, x, T, chunk_size=chunk_size, share_prefix=share, return_samples=True)
        assert r.logits is not None
        samples.append(r.logits)
    return samples


@pytest.mark.parametrize("name", list(MODELS))
def test_shared_prefix_draws_the_same_passes_when_all_fit_one_forward(name: str) -> None:
    """With all N·T rows in one forward the tiling is the same, so both ways draw the same masks."""
    shared, plain = same_draws(make(name), images(3), 24, chunk_size=72)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert distinct_passes(shared) == 24


def rows_seen(layer: nn.Module) -> list[int]:
    rows: list[int] = []
    layer.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    return rows


@pytest.mark.parametrize("chunk", [100, 1000, 6000])
def test_shared_prefix_runs_the_layers_before_the_first_dropout_once_per_input(chunk: int) -> None:
    torch.manual_seed(0)
    model, x, T = DropoutMLP(hidden_sizes=SMALL, dropouts=[1e-9, 1e-9]), images(300), 20
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    first_linear, head = linears[0], linears[-1]
    hidden_dropouts = [m for m in model.net if isinstance(m, Dropout) and m.p > 0]
    assert first_noise_layer(model, x) is hidden_dropouts[0]  # after Flatten, Linear, ReLU
    prefix, suffix = rows_seen(first_linear), rows_seen(head)
    r = mc_predict(model, x, T, chunk_size=chunk, return_samples=True)
    # first the one-row probe that finds the first dropout (it stops there), then the sharing check: 1 input x 2
    # passes and 2 inputs x 3 passes, each shared (1, 2 prefix rows) and repeated up front (2, 6 rows)
    assert prefix[:5] == [1, 1, 2, 2, 6] and suffix[:4] == [2, 2, 6, 6]
    # then each forward: chunk // 20 inputs x all 20 passes (one forward of 6000 rows for chunk 6000)
    assert sum(prefix[5:]) == 300 and max(prefix[5:]) == min(300, chunk // T)
    assert sum(suffix[4:]) == 300 * T and max(suffix) <= chunk
    # p ~ 0: every pass of input i must be input i's deterministic logits (the (pass, input) layout is right)
    assert r.logits is not None
    with torch.no_grad():
        det = model.eval()(x)
    torch.testing.assert_close(r.logits, det.expand(T, -1, -1), rtol=1e-5, atol=1e-5)
    prefix.clear()
    mc_predict(model, x, T, chunk_size=chunk, share_prefix=False)
    assert sum(prefix) == 300 * T


def example(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A network of the package and inputs for it: the MODELS, two in bf16, a channels-last LeNet, a regressor."""
    if name == "regression":
        return MCDropoutRegressor(hidden_size=8, num_layers=2), torch.linspace(-1, 1, 5)[:, None]
    if name == "lenet channels_last":
        return LeNet(channels=(4, 6), hidden=16, channels_last=True), images(3)
    base, _, dtype = name.partition(" ")
    model, x = make(base), images(3)
    return (model.to(torch.bfloat16), x.to(torch.bfloat16)) if dtype else (model, x)


EXAMPLES = [*MODELS, "dropout bf16", "lenet bf16", "lenet channels_last", "regression"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_model_shares_its_prefix(name: str) -> None:
    """The sharing check passes, without a warning, for every network of the package, in bf16 too."""
    model, x = example(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (mc_moments if name == "regression" else mc_predict)(model, x, 6)


def tensors(module: nn.Module) -> list[tuple[str, torch.dtype, int, torch.Tensor]]:
    """Every parameter's and buffer's name, dtype, storage and a copy of its values."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [(name, t.dtype, t.data_ptr(), t.detach().clone()) for name, t in named]


@pytest.mark.parametrize("name", [*EXAMPLES, "population bf16"])
def test_the_float64_probe_gives_every_tensor_back(name: str) -> None:
    """Inside, every floating parameter and buffer is float64; afterwards each is as it was: the same storage,
    dtype and values (a bf16 population keeps some float32 buffers: mixed dtypes)."""
    if name == "population bf16":
        model = PopulationMLP(hidden_sizes=(8,), dropouts=[[0.5], [0.1]]).to(torch.bfloat16)
        floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        assert {t.dtype for t in floating} == {torch.bfloat16, torch.float32}
    else:
        model, _ = example(name)
    before = tensors(model)
    with mc_passes._float64(model, torch.device("cpu")) as cast:
        assert all(t.dtype == torch.float64 for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
        assert cast(torch.ones(2)).dtype == torch.float64
        assert cast(torch.ones(2, dtype=torch.int64)).dtype == torch.int64
    after = tensors(model)
    assert [t[:3] for t in after] == [t[:3] for t in before]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(after, before, strict=True))


class BatchSizeRounding(nn.Module):
    """Rounds its output to bf16 in float32 forwards of more than one row, as a kernel picked by batch size may
    (TF32 tensor cores for a larger batch, say); exact in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.shape[0] > 1:
            return x.to(torch.bfloat16).to(torch.float32)
        return x


def test_the_sharing_check_ignores_rounding_that_depends_on_the_batch_size() -> None:
    torch.manual_seed(0)
    model = DropoutMLP(hidden_sizes=SMALL, dropouts=[0.5, 0.5])
    model.net.insert(2, BatchSizeRounding())  # after the first Linear: in the shared prefix
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared, plain = same_draws(model, images(3), 8)
    # the passes are the network's own up to that rounding (bf16: 8 significant bits)
    torch.testing.assert_close(shared, plain, rtol=0.05, atol=0.05)
    assert distinct_passes(shared) == 8


class SkipAroundDropout(nn.Module):
    """A net that reuses a tensor from before its dropout after it: prefix sharing cannot apply."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.drop, self.head = nn.Linear(784, 16), Dropout(0.5), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        return self.head(self.drop(h) + h)


def test_a_skip_connection_around_the_first_dropout_falls_back_to_whole_passes() -> None:
    torch.manual_seed(0)
    model = SkipAroundDropout()
    with pytest.warns(UserWarning, match="every pass runs through the whole net"):
        shared, plain = same_draws(model, images(3), 8)
    assert torch.equal(shared, plain) and distinct_passes(shared) == 8  # the fallback is share_prefix=False
    assert not model.drop._forward_pre_hooks  # the hook is gone
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one input per forward: the skip broadcasts over the passes, correctly
        shared, plain = same_draws(model, images(1), 8)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


class TwoBranches(nn.Module):
    """Two noise layers, each fed from before the other: sharing would give the second one mask for all passes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(784, 16), nn.Linear(784, 16)
        self.da, self.db, self.head = Dropout(0.5), Dropout(0.5), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(self.da(self.a(x)) + self.db(self.b(x)))


@pytest.mark.parametrize("n", [1, 3])
def test_a_second_noise_layer_fed_from_the_prefix_falls_back_to_whole_passes(n: int) -> None:
    """With one input per forward the branches broadcast: no shape error, only passes that share db's mask."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="share_prefix=False skips this check"):
        shared, plain = same_draws(TwoBranches(), images(n), 8)
    assert torch.equal(shared, plain) and distinct_passes(shared) == 8


class KeywordAndSequenceFirst(nn.Module):
    """Valid for sharing although a later noise layer is called by keyword on a (L, B, F) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.first, self.mid = nn.Linear(784, 12), Dropout(0.5), nn.Linear(4, 4)
        self.later, self.head = Dropout(0.3), nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(self.inp(x.flatten(1)))  # (B, 12)
        seq = self.mid(h.reshape(h.shape[0], 3, 4)).transpose(0, 1)  # (3, B, 4): sequence first
        return self.head(self.later(x=seq).transpose(0, 1).reshape(h.shape[0], 12))


def test_a_later_noise_layer_may_take_any_layout_or_keyword() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared, plain = same_draws(KeywordAndSequenceFirst(), images(3), 8)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert distinct_passes(shared) == 8


class ReusedDropout(nn.Module):
    """One dropout module applied after both hidden layers (a common way to write an MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.drop = nn.Linear(784, 16), nn.Linear(16, 12), nn.Linear(12, 10), Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.drop(self.l2(self.drop(self.l1(x.flatten(1))).relu()).relu()))


def test_a_dropout_module_used_twice_shares_the_prefix() -> None:
    model, x = ReusedDropout(), images(3)
    shared, plain = same_draws(model, x, 24, chunk_size=72)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    rows = summaries_vs_T(model, x, torch.arange(3), Ts=(2, 8), repeats=3, chunk_size=10)  # input slices too
    assert all(row["nll_se"] > 0 for row in rows)


def test_shared_prefix_keeps_the_channels_last_layout() -> None:
    model = LeNet(channels=(4, 6), hidden=16, channels_last=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    layouts: list[bool] = []
    convs[1].register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    mc_predict(model, images(3), 8, chunk_size=24)  # the repeat happens before the second convolution
    assert layouts and all(layouts)


def test_no_noise_layer_means_no_prefix_to_share() -> None:
    quiet = DropoutMLP(hidden_sizes=SMALL, dropouts=[0.0, 0.0])
    assert first_noise_layer(quiet, images(1)) is None
    model = make("dropconnect").eval()
    assert first_noise_layer(model, images(1)) is None  # eval mode without mc: no layer draws noise
    with mc_mode(model):
        assert isinstance(first_noise_layer(model, images(1)), DropConnectLinear)


# ---------------------------------------------------------------------------------------------- every model
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_gives_random_passes_in_eval_mode(name: str) -> None:
    model = make(name).eval()  # as Lightning leaves it for predict/test
    before = state(model)
    r = mc_predict(model, images(3), 16, return_samples=True)
    assert r.probs is not None and r.probs.shape == (16, 3, 10) and r.mean_logits.shape == (3, 10)
    check_invariants(r)
    assert distinct_passes(r.probs) >= 8  # the copies of one batch do not share their noise
    assert (r.mutual_information > 0).any()
    assert state(model) == before


def test_dropconnect_passes_differ_for_every_input() -> None:
    model, x = make("dropconnect"), images(2)
    r = mc_predict(model, x, 32, return_samples=True)
    assert r.probs is not None
    for n in range(2):  # the 32 copies of each input, inside one forward, each had its own weight mask
        assert distinct_passes(r.probs[:, n : n + 1]) == 32
    assert all(not m.per_sample for m in model.modules() if isinstance(m, DropConnectLinear))
    assert all(m.last_mask is None for m in model.modules() if isinstance(m, DropConnectLinear))


def test_without_noise_all_passes_agree_and_mi_is_zero() -> None:
    torch.manual_seed(0)
    model, x = DropoutMLP(hidden_sizes=SMALL, dropouts=[0, 0]), images(4)
    r = mc_predict(model, x, 10, return_samples=True)
    assert r.probs is not None
    assert torch.allclose(r.probs, r.probs[:1].expand_as(r.probs), atol=1e-6)
    assert torch.allclose(r.mutual_information, torch.zeros(4), atol=1e-6)
    assert torch.allclose(r.variance, torch.zeros(4, 10), atol=1e-6)
    assert torch.allclose(r.mean_probs, deterministic_predict(model, x), atol=1e-6)
    loop = mc_loop_predict(model, x, 3)
    assert torch.allclose(loop.mutual_information, torch.zeros(4), atol=1e-6)


# ---------------------------------------------------------------------------------------------- modes and flags
@pytest.mark.parametrize("train", [True, False])
def test_mc_mode_sets_then_restores_modes_and_flags(train: bool) -> None:
    model = make("dropconnect").train(train)
    model.net[0].train(not train)  # a mixed state must come back exactly
    first_dc = next(m for m in model.modules() if isinstance(m, DropConnectLinear))
    first_dc.mc = True  # a flag that was already on stays on
    before = state(model)
    with mc_mode(model, per_sample_dropconnect=True) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())
        assert all(m.mc for _, m in stochastic_modules(model))
        assert all(m.per_sample for m in model.modules() if isinstance(m, DropConnectLinear))
    assert state(model) == before
    assert first_dc.mc and sum(m.mc for _, m in stochastic_modules(model)) == 1


def test_state_is_restored_when_the_body_or_the_forward_raises() -> None:
    model = make("lenet").train()
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"), mc_mode(model):
        raise RuntimeError("boom")
    assert state(model) == before
    with pytest.raises(RuntimeError):  # wrong input shape: the forward raises inside mc_predict
        mc_predict(model, torch.rand(2, 3, 5, 5), 4, chunk_size=8)
    assert state(model) == before
    dc = make("dropconnect").eval()
    before = state(dc)
    with pytest.raises(RuntimeError):
        mc_predict(dc, torch.rand(2, 1, 28, 27), 4)
    assert state(dc) == before


class MCDropConnectMLP(DropConnectMLP):
    """What an integrator's predict step does: MC passes from inside Lightning's eval + inference mode."""

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert not self.training and torch.is_inference_mode_enabled()
        result = mc_predict(self, batch[0], 8, return_samples=True)
        assert result.probs is not None
        return result.probs


@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")
def test_mc_predict_survives_lightning_predict() -> None:
    torch.manual_seed(0)
    model = MCDropConnectMLP(hidden_sizes=SMALL, dropouts=[0.5, 0.5])
    data = DataLoader(TensorDataset(images(6), torch.zeros(6, dtype=torch.long)), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False,
    )  # fmt: skip
    batches = trainer.predict(model, data)
    assert [b.shape for b in batches] == [(8, 4, 10), (8, 2, 10)]
    assert all(distinct_passes(b) == 8 for b in batches)
    assert all(not m.mc and not m.per_sample for m in model.modules() if isinstance(m, DropConnectLinear))


def test_deterministic_predict_is_eval_mode_without_mc() -> None:
    model, x = make("dropout").train(), images(4)
    for _, m in stochastic_modules(model):
        m.mc = True
    before = state(model)
    p = deterministic_predict(model, x)
    assert torch.equal(p, deterministic_predict(model, x))  # no noise, although mc was on and train mode
    assert state(model) == before
    model.eval()
    for _, m in stochastic_modules(model):
        m.mc = False
    with torch.no_grad():
        assert torch.allclose(p, model(x).softmax(-1))


def test_stochastic_module_default_flag_is_untouched() -> None:
    mc_predict(make("dropout"), images(2), 3)
    assert StochasticModule.mc is False


def test_bad_number_of_passes_is_rejected() -> None:
    with pytest.raises(ValueError, match="T"):
        mc_predict(make("dropout"), images(2), 0)


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_of_perfect_and_uniform_predictors() -> None:
    targets = torch.arange(20) % 10
    perfect = calibration_metrics(torch.nn.functional.one_hot(targets, 10).float(), targets)
    assert perfect["accuracy"] == 1.0 and perfect["brier"] == 0.0 and perfect["confidence"] == 1.0
    assert perfect["nll"] == pytest.approx(0.0, abs=1e-9) and perfect["ece"] == pytest.approx(0.0, abs=1e-7)
    assert perfect["entropy"] == pytest.approx(0.0, abs=1e-9)
    uniform = calibration_metrics(torch.full((20, 10), 0.1), targets)
    assert uniform["nll"] == pytest.approx(math.log(10))
    assert uniform["brier"] == pytest.approx(0.9)  # (1 - 0.1)^2 + 9 * 0.1^2
    assert uniform["entropy"] == pytest.approx(math.log(10))
    assert uniform["accuracy"] == pytest.approx(0.1)  # ties go to class 0, the target of 2 of 20
    assert uniform["ece"] == pytest.approx(0.0, abs=1e-6)


def test_calibration_hand_example() -> None:
    probs = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    targets = torch.tensor([0, 1, 1, 1])
    m = calibration_metrics(probs, targets, n_bins=10)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(-(math.log(0.8) + math.log(0.2) + math.log(0.7) + math.log(0.6)) / 4)
    assert m["brier"] == pytest.approx((2 * 0.04 + 2 * 0.64 + 2 * 0.09 + 2 * 0.16) / 4)
    # bins: {0.8, 0.8} acc 0.5; {0.7} acc 1; {0.6} acc 1 -> (2 * 0.3 + 0.3 + 0.4) / 4
    assert m["ece"] == pytest.approx(1.3 / 4, abs=1e-6)
    bins = reliability_bins(probs, targets, n_bins=10)
    assert bins.count.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2, 0]
    assert bins.accuracy[8].item() == pytest.approx(0.5) and bins.confidence[8].item() == pytest.approx(0.8)
    assert math.isnan(bins.accuracy[0].item())
    assert bins.ece == pytest.approx(m["ece"], abs=1e-6)


def test_reliability_bins_agree_with_torchmetrics_ece() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(500, 10, generator=gen)).softmax(-1)
    targets = torch.randint(0, 10, (500,), generator=gen)
    bins = reliability_bins(probs, targets, n_bins=15)
    assert bins.count.sum() == 500 and bins.edges.shape == (16,)
    ece = multiclass_calibration_error(probs, targets, num_classes=10, n_bins=15, norm="l1").item()
    assert bins.ece == pytest.approx(ece, abs=1e-5)
    assert calibration_metrics(probs, targets)["ece"] == pytest.approx(ece, abs=1e-6)


def test_printed_and_plotted_ece_agree_at_confidence_one_and_in_bf16() -> None:
    """A confidence of exactly 1 is in the last bin for both (torchmetrics would give it a 16th bin)."""
    sure = torch.zeros(10, 10)
    sure[:, 0] = 30.0  # float32 softmax: exactly 1.0
    likely = torch.zeros(10, 10)
    likely[:, 0] = math.log(0.95 / 0.05 * 9)  # confidence 0.95
    probs = torch.cat([sure, likely]).softmax(-1)
    assert probs[:10].max(-1).values.eq(1.0).all()
    targets = torch.tensor([0] * 8 + [1] * 2 + [0] * 10)  # 0.8 right at confidence 1, all right at 0.95
    # one bin [14/15, 1]: |0.9 − 0.975| = 0.075
    assert calibration_metrics(probs, targets)["ece"] == pytest.approx(0.075, abs=1e-6)
    assert reliability_bins(probs, targets).ece == pytest.approx(0.075, abs=1e-6)
    gen = torch.Generator().manual_seed(1)
    half = (3 * torch.randn(500, 10, generator=gen)).softmax(-1).bfloat16()
    labels = torch.randint(0, 10, (500,), generator=gen)
    assert calibration_metrics(half, labels)["ece"] == calibration_metrics(half.float(), labels)["ece"]
    assert reliability_bins(half, labels).ece == calibration_metrics(half, labels)["ece"]


# ---------------------------------------------------------------------------------------------- T, figures
def test_summaries_vs_T(tmp_path) -> None:
    model, x = make("dropout"), images(20)
    targets = torch.arange(20) % 10
    rows = summaries_vs_T(model, x, targets, Ts=(5, 1, 20), repeats=3)
    assert [row["T"] for row in rows] == [1, 5, 20]
    for row in rows:
        assert 0 <= row["accuracy_mean"] <= 1 and row["nll_mean"] > 0 and row["entropy_mean"] > 0
        assert all(row[k] >= 0 for k in row if k.endswith("_se"))
    assert rows[1]["nll_se"] > 0 and rows[1]["entropy_se"] > 0  # the repeats are independent MC runs
    assert rows[0]["mutual_information_mean"] == pytest.approx(0.0, abs=1e-6)  # one pass has no disagreement
    assert rows[-1]["mutual_information_mean"] > 0
    quiet = DropoutMLP(hidden_sizes=SMALL, dropouts=[0.0, 0.0])
    flat = summaries_vs_T(quiet, x, targets, Ts=(1, 4), repeats=2)
    assert flat[0]["nll_se"] == pytest.approx(0.0, abs=1e-7) and flat[0]["nll_mean"] == pytest.approx(
        flat[1]["nll_mean"], abs=1e-6
    )
    assert math.isnan(summaries_vs_T(quiet, x, targets, Ts=(2,), repeats=1)[0]["nll_se"])
    det = calibration_metrics(deterministic_predict(model, x), targets)
    fig = plot_summaries_vs_T(rows, det)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    fig.savefig(tmp_path / "t.png")
    mc = mc_predict(model, x, 10)
    fig = plot_reliability(reliability_bins(deterministic_predict(model, x), targets),
                           reliability_bins(mc.mean_probs, targets))  # fmt: skip
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0


def test_rotated_image_experiment(tmp_path) -> None:
    model = make("lenet")
    image = torch.zeros(1, 28, 28)
    image[0, 4:24, 12:16] = 1.0  # a bar, so the rotations differ
    result = rotated_image_experiment(model, image, T=20, top_k=3)
    assert result["angles"] == [30.0 * i for i in range(12)]
    assert result["images"].shape == (12, 1, 28, 28)
    assert torch.allclose(result["images"][0], image)
    assert not torch.allclose(result["images"][3], image)
    assert result["logits"].shape == (20, 12, 3) and result["probs"].shape == (20, 12, 3)
    assert result["predictive_entropy"].shape == (12,) and result["mean_probs"].shape == (12, 10)
    assert len(result["classes"]) == 3 and len(result["class_names"]) == 3
    top = result["mean_probs"].max(0).values
    assert top[result["classes"][0]] == top.max()
    assert (result["probs"] >= 0).all() and (result["probs"] <= 1).all()
    table = rotated_table(result)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 12 and lines[2].startswith("| 0 |") and lines[-1].startswith("| 330 |")
    fig = plot_rotated(result)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    fig.savefig(tmp_path / "rotated.png")
    half = rotated_image_experiment(model, image[0], angles=[0, 90, 180], T=5, top_k=2)
    assert half["logits"].shape == (5, 3, 2)

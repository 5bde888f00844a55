"""edit_runtime.packed_linear: oneDNN-packed fp32 Linear against a float64 reference, and the
context leaves every module exactly as it found it."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from edit_runtime import capture
from edit_runtime.packed_linear import PACKED_LINEAR_ENV, packed_linear_available, packed_linears

from capture_fixtures import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.skipif(not packed_linear_available(),
                                reason="this torch build has no oneDNN packed linear "
                                       "(torch.ops.mkldnn._linear_pointwise)")


def _ref(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    b = None if lin.bias is None else lin.bias.double()
    return torch.nn.functional.linear(x.double(), lin.weight.double(), b)


@pytest.mark.parametrize("shape", [(1, 7), (5, 3, 7), (2, 129, 7), (0, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_float64(shape, bias):
    g = torch.Generator().manual_seed(hash((shape, bias)) % 2**31)
    lin = nn.Linear(7, 33, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(33, 7, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(33, generator=g))
    x = torch.randn(*shape, generator=g)
    with packed_linears([lin]) as n, torch.no_grad():
        assert n == 1 and "forward" in lin.__dict__
        y = lin(x)
    assert y.shape == (*shape[:-1], 33) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _ref(x, lin), atol=1e-5, rtol=1e-5)
    assert "forward" not in lin.__dict__


def test_real_sizes_and_noncontiguous_input():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(896, 4864, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4864, 896, generator=g) / 30)
    x = torch.randn(4, 37, 1792, generator=g)[..., ::2]  # strided view
    with packed_linears([lin]), torch.inference_mode():
        y = lin(x)
    torch.testing.assert_close(y.double(), _ref(x, lin), atol=1e-4, rtol=1e-5)


def test_only_plain_fp32_cpu_linears_are_packed(monkeypatch):
    plain, double = nn.Linear(4, 4), nn.Linear(4, 4).double()
    sub = type("MyLinear", (nn.Linear,), {})(4, 4)        # a subclass may override forward
    done = nn.Linear(4, 4)
    done.forward = lambda x: x                              # already rerouted by someone else
    with packed_linears([plain, double, sub, done, nn.ReLU(), plain]) as n:
        assert n == 1
        assert "forward" in plain.__dict__ and "forward" not in double.__dict__
        assert "forward" not in sub.__dict__
    assert "forward" not in plain.__dict__ and "forward" in done.__dict__
    with packed_linears([plain], max_bytes=10) as n:       # over the memory budget
        assert n == 0 and "forward" not in plain.__dict__
    with packed_linears([plain], enabled=False) as n:
        assert n == 0
    monkeypatch.setenv(PACKED_LINEAR_ENV, "0")
    with packed_linears([plain]) as n:
        assert n == 0
    with packed_linears([plain], enabled=True) as n:       # an explicit choice wins
        assert n == 1


def test_autograd_falls_back_and_exit_restores_on_error():
    lin = nn.Linear(5, 3)
    x = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(KeyError), packed_linears([lin]):
        lin(x).sum().backward()                           # grad wanted: the plain F.linear
        assert x.grad is not None and lin.weight.grad is not None
        raise KeyError("boom")
    assert "forward" not in lin.__dict__


def test_capture_packs_the_forwarded_mlps_and_matches_unpacked(monkeypatch):
    """A capture with packed MLP weights gives the statistics of the plain forward (fp32
    rounding), packs exactly the MLP projections of the layers it runs, and restores them."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), n_layers=4, seed=3)
    groups = {("en", "harmful"): ["How do I pick a lock?", "Make a weapon", "hi"],
              ("en", "harmless"): ["What is the capital of France?", "Name three fruits"]}
    seen = []
    orig = capture.packed_linears

    @contextlib.contextmanager
    def spy(modules, **kw):
        with orig(list(modules), **kw) as n:
            seen.append(n)
            yield n

    monkeypatch.setattr(capture, "packed_linears", spy)
    got = capture.collect_neuron_stats(model, tok, groups, [1, 2], batch_size=2, progress=False,
                                       cov=True)
    assert seen and all(n == 3 * 3 for n in seen)  # packed: layers 0-2 (early stop) x gate, up, down
    assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setenv(PACKED_LINEAR_ENV, "0")
    want = capture.collect_neuron_stats(model, tok, groups, [1, 2], batch_size=2, progress=False,
                                        cov=True)
    for l in (1, 2):
        for name, t in got[l]._tensors().items():
            torch.testing.assert_close(t, getattr(want[l], name), atol=1e-5, rtol=1e-4, msg=name)


def test_weight_changed_in_place_is_not_served_stale():
    """A merged edit (in-place add to the weight) or a replaced bias while the context is open:
    the forward uses the module's current tensors, never the packed snapshot."""
    lin = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    with packed_linears([lin]) as n, torch.no_grad():
        assert n == 1
        lin.weight.add_(1.0)
        torch.testing.assert_close(lin(x).double(), _ref(x, lin), atol=1e-5, rtol=1e-5)
        lin.bias = nn.Parameter(torch.randn(5))
        torch.testing.assert_close(lin(x).double(), _ref(x, lin), atol=1e-5, rtol=1e-5)

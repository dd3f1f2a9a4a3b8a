"""torchsan.InferenceSession: a model's eval forward recorded per kind of input and replayed."""

from __future__ import annotations

import weakref

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import num_threads
from torchsan import InferenceSession, ops

# (model, kwargs, input size): each SAN form on the small-input layout, maps the attention kernels take, and ResNet
MODELS = [("san10_pairwise", dict(small_input=True), 32), ("san10_patchwise", dict(small_input=True), 32),
          ("san10_pairwise", {}, 128), ("san_resnet26", dict(small_input=True), 32)]


def _model(name: str, kwargs: dict) -> nn.Module:
    """The pooled features (no classifier), every conv random (the blocks' last ones are zero at init) at a scale
    that keeps the residual stream finite, and BN statistics other than the initial ones."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (0.5 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=lambda v: str(v))
def test_session_replays_the_forward_bit_for_bit(name, kwargs, size):
    model = _model(name, kwargs)
    session = InferenceSession(model)
    for batch in (2, 1, 2):  # a second kind of input gets its own recording; the first is replayed again
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            expected = model(x)
        assert torch.equal(session(x), expected)
        assert torch.equal(session(x), expected)  # the replay, not the recording
    assert len(session._plans) == 2
    other = session(torch.randn_like(x))
    assert (other - expected).abs().max() > 1e-3  # (the features depend on the input)
    with ops.fusion(False), torch.inference_mode():  # and the modules' function, within float rounding
        torch.testing.assert_close(session(x), model(x), rtol=1e-4, atol=1e-4)


def test_session_replays_fewer_ops_than_the_forward_dispatches():
    """What does not depend on the input (the BNs' affine maps, stacked weights, the position encoding) is computed
    once, at the recording."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    model = _model("san10_pairwise", dict(small_input=True))
    session = InferenceSession(model)
    x = torch.randn(2, 3, 32, 32)
    session(x)
    with Count(), torch.inference_mode():
        model(x)
    (plan,) = session._plans.values()
    assert 0 < len(plan.steps) < Count.ops / 2


def test_session_is_a_snapshot_of_the_model():
    model = _model("san10_pairwise", dict(small_input=True))
    x = torch.randn(2, 3, 32, 32)
    session = InferenceSession(model)
    before = session(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(2)
    assert torch.equal(session(x), before)  # the weights it recorded with
    with torch.inference_mode():
        changed = model(x)
    assert not torch.allclose(changed, before)
    assert torch.equal(InferenceSession(model)(x), changed)  # a new session sees the new weights


def test_session_records_again_for_other_thread_counts_and_strides():
    model = _model("san10_pairwise", {})
    session = InferenceSession(model)
    x = torch.randn(1, 3, 128, 128)
    for threads in (1, 2, 1):  # the kernels' rules depend on the thread count: so do the recorded routes
        with num_threads(threads), torch.inference_mode():
            expected = model(x)
        with num_threads(threads):
            assert torch.equal(session(x), expected)
    with num_threads(2):
        torch.testing.assert_close(session(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-5,
                                   atol=1e-5)
    assert len(session._plans) == 3


class _Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu()


class _Random(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(x.sum())
        return x * 2


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x * 3


class _ThroughNumpy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.from_numpy(x.numpy()).sum()  # the input's memory in a tensor no op made


class _Writes(nn.Module):
    """Writes into its input, and splits a tensor into one piece (an op that returns a list of one tensor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (whole,) = x.mul_(2).split(x.shape[1], dim=1)
        return whole + 1


class _OffPathWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.ones(1, 3, 1, 1)
        y = x + c
        c.add_(1)  # a value off the input's path, written after a read: a replay would keep the first read's value
        return y * c


class _ValueSized(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[x > 0]  # a size that depends on the values
        return x * v.numel()


class _Poisson(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.poisson(x.abs())


class _Layout(nn.Module):
    """Takes a route by the input's layout, in Python: the recording must see the layout of the calls it serves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.is_contiguous() else x * 3


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return x.relu(), {"scaled": x * 2, "constant": torch.ones(3)}


def test_session_refuses_forwards_a_replay_would_change():
    x = torch.randn(1, 3, 4, 4)
    hooked = _Hooked()
    hooked.conv.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="forward hooks"):
        InferenceSession(hooked)(x)
    backward_hooked = _Hooked()  # a replay runs no backward: a backward hook does not stop it
    backward_hooked.conv.register_full_backward_hook(lambda *args: None)
    torch.testing.assert_close(InferenceSession(backward_hooked)(x), backward_hooked.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="random numbers"):
        InferenceSession(_Random())(x)
    with pytest.raises(ValueError, match="writes into a tensor that is not on the input's path"):
        InferenceSession(_Counting())(x)
    with pytest.raises(ValueError, match="reads a value of the input's path into Python"):
        InferenceSession(_DataDependent())(x)
    with pytest.raises(ValueError, match="through a tensor that no op made"):
        InferenceSession(_ThroughNumpy())(x)
    with pytest.raises(ValueError, match="writes into a tensor that is not on the input's path"):
        InferenceSession(_OffPathWrite())(x)
    with pytest.raises(ValueError, match="depends on the input's values"):
        InferenceSession(_ValueSized())(x)
    with pytest.raises(ValueError, match="random numbers"):
        InferenceSession(_Poisson())(x)
    with pytest.raises(TypeError, match="one tensor"):
        InferenceSession(_Pair())([x])


def test_session_records_each_layout_as_it_comes():
    session, base = InferenceSession(_Layout()), torch.randn(1, 3, 4, 6)
    sliced, expanded = base[..., :4], torch.randn(1, 3, 1, 1).expand(1, 3, 4, 4)
    for x in (base, sliced, sliced.clone(), expanded):
        assert torch.equal(session(x), _Layout()(x.contiguous() if x.stride()[-1] == 0 else x))


def test_session_keeps_its_own_copy_of_the_model():
    model = nn.Conv2d(3, 4, 1)
    session = InferenceSession(model)
    x = torch.randn(1, 3, 4, 4)
    with torch.inference_mode():
        expected = model(x)
    with torch.no_grad():
        model.weight.mul_(3)
    model.register_forward_hook(lambda *args: None)  # nor do the model's hooks reach it
    assert torch.equal(session(x), expected)
    # a new kind of input: recorded with the weights it copied (the tripled ones would give 3x)
    torch.testing.assert_close(session(torch.cat([x, x]))[1:], expected, rtol=1e-5, atol=1e-6)


def test_session_writes_into_its_input_as_the_forward_does():
    session = InferenceSession(_Writes())
    for _ in range(2):  # the recording, then a replay
        x = torch.randn(1, 3, 4, 4)
        original = x.clone()
        out = session(x)
        assert torch.equal(x, original * 2) and torch.equal(out, original * 2 + 1)


def test_session_returns_the_forwards_structure():
    x = torch.randn(2, 3, 4, 4)
    relu, rest = InferenceSession(_Pair())(x)
    assert torch.equal(relu, x.relu()) and torch.equal(rest["scaled"], x * 2) and torch.equal(rest["constant"],
                                                                                            torch.ones(3))


class _Chain(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = x * 1.5
        y = first
        for _ in range(8):
            y = y * 1.5
        return y, first  # `first` is returned: it must outlive the chain


class _LiveCounter(TorchDispatchMode):
    """The most op outputs alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.alive.add(out)
        self.most = max(self.most, len(self.alive))
        return out


def test_session_frees_each_value_after_its_last_use():
    session = InferenceSession(_Chain())
    x = torch.randn(2, 3, 4, 4)
    session(x)  # the recording
    counter = _LiveCounter()
    with counter:
        y, first = session(x)
    assert counter.most <= 3  # `first`, the chain's last value and the one it makes: not all nine as in a list
    torch.testing.assert_close(first, x * 1.5, rtol=0, atol=0)
    torch.testing.assert_close(y, x * 1.5 ** 9, rtol=1e-6, atol=0)

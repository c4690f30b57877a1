"""Layer and position resolution: the index space of transformers' output_hidden_states."""

from __future__ import annotations

import pytest
import torch

from loom_kernel.capture import check_positions, resolve_layers, resolve_positions
from loom_kernel.errors import InvalidField


def test_layer_indices_follow_output_hidden_states():
    n = 4
    assert [(s.key, s.index) for s in resolve_layers([0, 2, -1, -5], n)] == [("0", 0), ("2", 2), ("-1", 4), ("-5", 0)]
    assert [(s.key, s.index) for s in resolve_layers("all", n)] == [("-4", 1), ("-3", 2), ("-2", 3), ("-1", 4)]
    assert [s.index for s in resolve_layers(-1, n)] == [4]
    assert [s.key for s in resolve_layers([-1, -1], n)] == ["-1"]


@pytest.mark.parametrize("bad", [[5], [-6], ["x"], "every", [True]])
def test_out_of_range_layers_are_refused(bad):
    with pytest.raises(InvalidField) as err:
        resolve_layers(bad, 4)
    assert err.value.field == "hidden_state_layers"
    assert "-5 to 4" in err.value.allowed


def test_positions():
    assert resolve_positions("last", 7, 4) == [6]
    assert resolve_positions("all", 3, 2) == [0, 1, 2]
    assert resolve_positions("prompt", 7, 4) == [0, 1, 2, 3]
    assert resolve_positions("generated", 7, 4) == [4, 5, 6]
    assert resolve_positions([0, -1], 7, 4) == [0, 6]
    with pytest.raises(InvalidField):
        resolve_positions([7], 7, 4)
    for bad in ("first", [], ["a"], 3):
        with pytest.raises(InvalidField):
            check_positions(bad)


class _Block(torch.nn.Module):
    """A block whose output is a tuple, as transformers' blocks return (hidden, extras)."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, hidden_states):
        return (hidden_states + self.lin(hidden_states).tanh(), None)


class _Net(torch.nn.Module):
    def __init__(self, width: int = 8, n: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, width)
        self.blocks = torch.nn.ModuleList(_Block(width, i) for i in range(n))
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(hidden_states=x)[0]
        return self.norm(x)


@pytest.mark.parametrize("index", [0, 2, 3])
def test_the_recorder_edits_and_keeps_what_plain_torch_hooks_do(index):
    """The one recorder's edit at an index (0 the first block's input, a block's output, N the final norm's output)
    equals the same edit written as plain torch hooks, and the states it keeps are the edited ones downstream."""
    import torch

    from loom_kernel.capture import StateRecorder

    net, ids = _Net(), torch.tensor([[1, 5, 7, 2]])
    shift = torch.arange(8, dtype=torch.float32) / 10
    n = len(net.blocks)

    seen: dict[int, torch.Tensor] = {}
    if index == 0:
        handle = net.blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: (args, {"hidden_states": kwargs["hidden_states"] + shift}), with_kwargs=True
        )
    elif index == n:
        handle = net.norm.register_forward_hook(lambda m, args, out: out + shift)
    else:
        handle = net.blocks[index - 1].register_forward_hook(lambda m, args, out: (out[0] + shift, *out[1:]))
    keep = [net.blocks[i - 1].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[0])) for i in (1, 2)]
    with torch.no_grad():
        expected = net(ids)
    for h in [handle, *keep]:
        h.remove()

    recorder = StateRecorder(net, net.blocks, [1, 2, n], final=net.norm, edit=lambda i, h: h + shift, edited=[index])
    with recorder, torch.no_grad():
        out = net(ids)
    taken = recorder.taken()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(taken[n][0], expected[0])
    for i in (1, 2):
        torch.testing.assert_close(taken[i][0], seen[i][0])
    assert not net.blocks[0]._forward_pre_hooks and not net.norm._forward_hooks  # the recorder removed its hooks


def test_the_kernels_lens_is_the_norm_and_head_alone_while_a_pass_has_its_hooks_on_them():
    """The kernel's lens for declared parts runs on the output processor's thread while a row's pass on the model's
    thread has its recorder on the final norm (an edit of index N, its recording): the lens is the norm and the head
    alone. Through the hooks, the pass's edit reached the lens's states and its recording kept them."""
    from loom_kernel import LoadedModel, LoadOptions, ModelRef
    from loom_kernel.capture import StateRecorder
    from loom_kernel.generic import unembed
    from loom_kernel.types import ModelParts

    net, head = _Net(), torch.nn.Linear(8, 11)
    n = len(net.blocks)
    parts = ModelParts(blocks=net.blocks, final_norm=net.norm, lm_head=head)
    model = LoadedModel(
        ref=ModelRef(id="toy"),
        loader="toy",
        model=net,
        tokenizer=None,
        options=LoadOptions(),
        num_layers=n,
        hidden_size=8,
        parts=parts,
    )
    states = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = head(net.norm(states))
    recorder = StateRecorder(net, net.blocks, [n], final=net.norm, edit=lambda i, h: h + 5.0, edited=[n])
    with recorder:  # a pass's hooks, on the modules the lens runs
        got = unembed(model, states, False)
    torch.testing.assert_close(got, want)
    assert recorder.taken() == {}  # nothing of the lens's kept as the pass's state

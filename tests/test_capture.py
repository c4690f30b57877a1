"""Layer and position resolution: the index space of transformers' output_hidden_states."""

from __future__ import annotations

import pytest

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

"""autopatch.registry: a control is one entry, its vector rule included."""

from __future__ import annotations

import pytest
import torch

from autopatch import registry
from autopatch.errors import ConfigError
from autopatch.strategies import control_vector


def half_vector(vector: torch.Tensor, seed_text: str) -> torch.Tensor:
    return vector / 2


def test_a_control_registered_after_import_is_applied_by_its_own_rule():
    registry.register_control(registry.ControlSpec("half", "half the vector", "tests.test_registry:half_vector"))
    try:
        vector = torch.ones(4)
        assert torch.equal(control_vector(vector, "half", "q"), vector / 2)
        assert control_vector(vector, None, "q") is vector
    finally:
        del registry.CONTROLS["half"]


def test_the_shipped_controls_keep_their_vectors():
    vector = torch.arange(1.0, 5.0)
    random = control_vector(vector, "random", "q")
    assert torch.allclose(random.norm(), vector.norm()) and torch.equal(random, control_vector(vector, "random", "q"))
    assert not torch.equal(random, control_vector(vector, "random", "another question"))
    assert torch.equal(control_vector(vector, "zero", "q"), torch.zeros(4))
    assert control_vector(vector, "nopatch", "q") is None and control_vector(vector, "text", "q") is None
    with pytest.raises(ConfigError, match="Unknown control 'nope'; choose one of random, zero, nopatch, text"):
        control_vector(vector, "nope", "q")

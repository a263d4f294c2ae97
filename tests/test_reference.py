"""The test references: a missing one is a clear error naming what to install, not an AttributeError."""

from __future__ import annotations

import importlib.util
import sys

import pytest

import reference


def test_missing_segment_anything_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "segment_anything" else real_find_spec(name, *args))
    monkeypatch.delitem(sys.modules, "segment_anything", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"the tests compare with Meta's segment-anything, which is not "
                                                  r"installed: install the test references: bash \.ci/run"):
        reference.segment_anything_modeling()
    assert "segment_anything" not in sys.modules


def test_present_reference_is_found():
    assert reference.require("torch", "PyTorch").name == "torch"

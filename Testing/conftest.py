"""Shared fixtures: the synthetic case is generated once per session into a temporary folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the engine package lives next to the Slicer module file; make it importable without installation too
sys.path.insert(0, str(ROOT / "ReirradiationNPC"))


@pytest.fixture(scope="session")
def synthetic_case(tmp_path_factory) -> Path:
    """Path of the generated synthetic case file with the prior dose pre-registered (case_identity.yaml: exact and
    fast). The demo's case.yaml (rigid registration of the prior CT) sits beside it."""
    from ReirradiationNPCLib.synthetic import generate
    return generate(tmp_path_factory.mktemp("synthetic") / "case").parent / "case_identity.yaml"

"""Editing a protocol value (the Slicer module's protocol table): copy on first edit, validated before writing."""

from __future__ import annotations

import pytest

from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.protocol import load_protocol, resolve_protocol
from ReirradiationNPCLib.protocol_edit import edit_protocol


def _brainstem_d003(p):
    return next(c for c in p.organs["brainstem"].constraints if c.metric.name == "D0.03cc")


def test_first_edit_writes_a_named_copy_and_leaves_the_shipped_file(tmp_path):
    shipped = resolve_protocol("synthetic-demo")
    before = shipped.read_bytes()
    dst = tmp_path / "edited.yaml"
    p = edit_protocol(shipped, dst, "brainstem", "limit", "48", constraint=0)
    assert shipped.read_bytes() == before
    assert _brainstem_d003(p).limit == 48.0 and _brainstem_d003(load_protocol(str(dst))).limit == 48.0
    assert p.name.endswith("(edited)")
    # a second edit of the copy keeps the first one
    p2 = edit_protocol(dst, dst, "brainstem", "alpha_beta", "2.5")
    assert p2.organs["brainstem"].alpha_beta == 2.5 and _brainstem_d003(p2).limit == 48.0
    assert p2.name.count("(edited)") == 1


def test_volume_limit_keeps_its_unit_and_verified_flag_edits(tmp_path):
    shipped = resolve_protocol("synthetic-demo")
    dst = tmp_path / "e.yaml"
    idx = [c.metric.name for c in load_protocol("synthetic-demo").organs["temporal_lobe_l"].constraints].index("V40Gy")
    p = edit_protocol(shipped, dst, "temporal_lobe_l", "limit", "2.5 cc", constraint=idx)
    c = p.organs["temporal_lobe_l"].constraints[idx]
    assert (c.limit, c.unit) == (2.5, "cc")
    p = edit_protocol(dst, dst, "temporal_lobe_l", "verified", "yes", constraint=idx)
    assert p.organs["temporal_lobe_l"].constraints[idx].verified is True


@pytest.mark.parametrize("organ,field,value,constraint,message", [
    ("brainstem", "alpha_beta", "-1", None, "alpha_beta"),
    ("brainstem", "alpha_beta", "two", None, "must be a number"),
    ("spinal_cord", "limit", "-", 0, "verified"),          # a verified row cannot lose its limit
    ("brainstem", "verified", "maybe", 0, "yes or no"),
    ("nosuchorgan", "alpha_beta", "2", None, "no organ"),
    ("brainstem", "limit", "50", 7, "no constraint number 7"),
])
def test_bad_edits_are_refused_and_nothing_is_written(tmp_path, organ, field, value, constraint, message):
    dst = tmp_path / "e.yaml"
    with pytest.raises(InputError, match=message):
        edit_protocol(resolve_protocol("synthetic-demo"), dst, organ, field, value, constraint=constraint)
    assert not dst.exists() and not list(tmp_path.iterdir())

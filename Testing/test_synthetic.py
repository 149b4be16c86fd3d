"""The synthetic NPC case and `reirradiation-npc demo`: runs, prints the constraints table with passes and
failures, deterministic, holds every structure the issue lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from click.testing import CliRunner

from analytic import eqd2_hand, run_cli
from ReirradiationNPCLib.cli import main

STRUCTURES = ["External", "Brainstem", "SpinalCord", "OpticChiasm", "OpticNrv_L", "OpticNrv_R", "Lobe_Temporal_L",
              "Lobe_Temporal_R", "A_Carotid_L", "A_Carotid_R", "Cochlea_L", "Cochlea_R", "Parotid_L", "Parotid_R",
              "GTVp"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = run_cli("demo", "--output", out)
    return out, proc


def arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_demo_exits_0_and_prints_the_constraints_table(demo):
    out, proc = demo
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    text = proc.stdout
    assert "SYNTHETIC" in text
    header = [ln for ln in text.splitlines() if ln.startswith("status")]
    assert header and all(w in header[0] for w in ("organ", "structure", "metric", "value", "limit"))
    rows = [ln.split()[0] for ln in text.splitlines() if ln.split() and ln.split()[0] in
            ("pass", "FAIL", "warn", "no_limit", "not_evaluated")]
    assert rows.count("FAIL") >= 1 and rows.count("pass") >= 1
    assert (out / "results" / "results.json").is_file()
    res = json.loads((out / "results" / "results.json").read_text())
    assert res["protocol"]["synthetic"] is True
    statuses = [c["status"] for c in res["constraints"]]
    assert "fail" in statuses and "pass" in statuses
    # every constraint row of results.json is printed
    assert len(rows) == len(res["constraints"])


def test_demo_case_has_every_structure(demo):
    out, _ = demo
    case = out / "case"
    for name in STRUCTURES:
        p = case / "structures" / f"{name}.nrrd"
        assert p.is_file(), name
        assert arr(p).any(), name
    res = json.loads((out / "results" / "results.json").read_text())
    assert {s["name"] for s in res["structures"]} >= set(STRUCTURES)
    assert res["unmatched_structures"] == []


def test_demo_case_courses(demo):
    out, _ = demo
    case = yaml.safe_load((out / "case" / "case.yaml").read_text())
    prior, current = case["courses"]
    assert prior["fractions"] == 33 and prior["interval_months"] > 0
    assert current["fractions"] == 54 and "interval_months" not in current
    d1 = arr(out / "case" / prior["dose"])
    d2 = arr(out / "case" / current["dose"])
    # 70 Gy in 33 fractions and 65 Gy in 54 fractions, with fall-off (prescription reached inside the targets)
    assert 0.97 * 70 <= d1.max() <= 70.0 + 1e-3 and d1.min() >= 0
    # the current plan is normalised to cover its PTV: hot spot 103 % (synthetic.CURRENT_NORMALISATION)
    assert 0.97 * 65 * 1.03 <= d2.max() <= 65.0 * 1.03 + 1e-3 and d2.min() >= 0
    assert (d1 < 0.5 * 70).mean() > 0.3 and (d2 < 0.5 * 65).mean() > 0.3
    ct = arr(out / "case" / "ct.nrrd")
    assert ct.min() <= -990 and ct.max() >= 500  # HU: air and bone
    offset = json.loads((out / "case" / "known_prior_offset.json").read_text())
    assert "translation_mm" in offset
    assert (out / "case" / "ct_prior.nrrd").is_file()


def test_demo_maps_consistent_with_hand_calculation(demo):
    """On the current dose grid (the evaluation grid): the current course's EQD2 is the hand formula of its own dose
    file with the written alpha/beta map; the cumulative map is e1 + e2 or, on the credited spinal cord (30 months:
    50 %), 0.5 e1 + e2 - nothing else."""
    out, _ = demo
    res_dir = out / "results"
    d2 = arr(out / "case" / "dose_course2.nrrd").astype(np.float64)
    ab = arr(res_dir / "alpha_beta.nrrd").astype(np.float64)
    e1 = arr(res_dir / "eqd2_course1.nrrd").astype(np.float64)
    e2 = arr(res_dir / "eqd2_course2.nrrd").astype(np.float64)
    cum = arr(res_dir / "cumulative_eqd2.nrrd").astype(np.float64)
    assert set(np.unique(ab)) <= {2.0, 3.0, 10.0}
    np.testing.assert_allclose(e2, eqd2_hand(d2, 54, ab), atol=1e-3)
    full = np.isclose(cum, e1 + e2, atol=1e-3)
    half = np.isclose(cum, 0.5 * e1 + e2, atol=1e-3)
    assert np.all(full | half)
    credited = half & ~full
    assert credited.sum() > 0
    assert np.all(ab[credited] == 2.0)  # the spinal cord (alpha/beta 2) is the only organ given credit


def test_generation_is_deterministic(demo, synthetic_case):
    """Two independent generations (the demo's and the session fixture's) give identical files' arrays."""
    out, _ = demo
    a_dir, b_dir = out / "case", synthetic_case.parent
    names = ["ct.nrrd", "ct_prior.nrrd", "dose_course1.nrrd", "dose_course2.nrrd",
             "dose_course1_prior_frame.nrrd"] + [f"structures/{s}.nrrd" for s in STRUCTURES]
    for name in names:
        ia, ib = sitk.ReadImage(str(a_dir / name)), sitk.ReadImage(str(b_dir / name))
        assert ia.GetOrigin() == ib.GetOrigin() and ia.GetSpacing() == ib.GetSpacing(), name
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib), err_msg=name)
    assert (a_dir / "case.yaml").read_text() == (b_dir / "case.yaml").read_text()


def test_demo_refuses_folder_in_use(tmp_path):
    (tmp_path / "x.txt").write_text("keep")
    r = CliRunner().invoke(main, ["demo", "--output", str(tmp_path)])
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr
    assert (tmp_path / "x.txt").read_text() == "keep"

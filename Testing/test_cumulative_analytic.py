"""Analytic cases run through the command line; every voxel and metric checked against hand calculation.

Main case (20 x 20 x 10 voxels, 2 mm, dose grid = CT grid = structure grid, so nothing is interpolated):
three courses with known linear dose gradients, box-shaped organs (overlapping, different alpha/beta), a
recovery step table written here (< 6 months 0, 6-12 months 25 %, >= 12 months 50 %) for two organs, an
unmatched structure, a body outline and an organ of the protocol that is absent from the case.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from analytic import box, coords, eqd2_hand, read_array, step_credit, write_image, write_yaml
from ReirradiationNPCLib.cli import main

SIZE = (20, 20, 10)                 # i, j, k
ORIGIN = (-19.0, -19.0, -9.0)       # mm
SPACING = (2.0, 2.0, 2.0)           # mm -> 0.008 cc per voxel
SHAPE = (SIZE[2], SIZE[1], SIZE[0])
VOXEL_CC = 0.008
DEFAULT_AB = 3.5
TABLE = [(0, 0.0), (6, 0.25), (12, 0.5)]

# doses (Gy) as linear functions of the physical position (mm); unique values in every box
DOSE_FUNCS = {
    "c1": lambda x, y, z: 45.0 + 0.9 * x + 0.045 * y + 0.0021 * z,     # 27 .. 63 Gy
    "c2": lambda x, y, z: 30.0 + 0.5 * y + 0.02 * x + 0.001 * z,       # 20 .. 40 Gy
    "c3": lambda x, y, z: 25.0 + 0.6 * z + 0.3 * x + 0.011 * y,        # 14 .. 36 Gy
}
COURSES = [  # name, fractions, interval (months)
    ("c1", 33, 14.0), ("c2", 25, 8.0), ("c3", 10, None)]
# organ key -> (structure name, alpha/beta, box (k, j, i), role, recovery?)
ORGANS = {
    "spinal_cord": ("SpinalCord", 2.0, ((1, 9), (12, 16), (8, 12)), "oar", True),
    "brainstem": ("brainstem", 2.5, ((6, 9), (10, 18), (6, 14)), "oar", False),      # lower-case alias
    "parotid_l": ("Parotid_L", 4.0, ((2, 8), (2, 8), (2, 10)), "oar", True),
    "gtv": ("GTVp", 10.0, ((3, 9), (4, 12), (6, 16)), "target", False),
    "external": ("External", 1.5, ((1, 9), (1, 19), (1, 19)), "body", False),
}
UNMATCHED = ("Mystery", ((1, 4), (1, 4), (1, 4)))


def protocol_dict(limits: dict) -> dict:
    def con(metric, scope, limit, key="limit_gy", verified=False):
        # the hand values of this case are the credited sums: the cumulative limits say so (basis: credited)
        return {"metric": metric, key: limit, "scope": scope, "source": f"test {metric}", "verified": verified,
                **({"basis": "credited"} if scope == "cumulative" else {})}
    return {
        "name": "Analytic test protocol", "version": "7.3",
        "alpha_beta": {"default": DEFAULT_AB},
        "recovery": {"model": "step", "table": [{"min_months": m, "fraction": f} for m, f in TABLE],
                     "organs": ["spinal_cord", "parotid_l"], "source": "test table"},
        "organs": {
            "spinal_cord": {"aliases": ["SpinalCord"], "alpha_beta": 2.0, "constraints": [
                con("D0.03cc", "cumulative", limits["cord_d003"], verified=True),   # fails
                con("Dmax", "current", limits["cord_dmax_cur"]),                     # passes
                con("V70Gy", "cumulative", limits["cord_v70_cc"], key="limit_cc"),  # fails
                con("V70Gy", "cumulative", limits["cord_v70_pct"], key="limit_percent"),  # passes
            ]},
            "brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2.5, "constraints": [
                con("Dmean", "cumulative", None),                                    # no_limit
                con("D1cc", "cumulative", limits["bs_d1cc"]),                        # passes
            ]},
            "parotid_l": {"aliases": ["Parotid_L"], "alpha_beta": 4.0, "constraints": [
                con("Dmean", "cumulative", limits["par_dmean"]),                     # fails
            ]},
            "optic_chiasm": {"aliases": ["OpticChiasm"], "alpha_beta": 2.0, "constraints": [
                con("D0.03cc", "cumulative", 54.0)]},                                # not_evaluated
            "gtv": {"role": "target", "aliases": ["GTVp"], "alpha_beta": 10.0},
            "external": {"role": "body", "aliases": ["External"], "alpha_beta": 1.5},
        },
    }


# ------------------------------------------------------------------------------------ hand calculation

def hand_doses():
    x, y, z = coords(SIZE, ORIGIN, SPACING)
    # the doses as stored (float32), then in float64 for the hand calculation
    return {c: f(x, y, z).astype(np.float32) for c, f in DOSE_FUNCS.items()}


def masks():
    return {key: box(SHAPE, *spec[2]) for key, spec in ORGANS.items()}


def hand_maps(doses):
    """Display maps by the rule of issue 10 item 3, region by region: per voxel the LARGEST value over the organs
    covering it, each organ with its own alpha/beta and credit (the course maps: the largest EQD2 of that course);
    the default alpha/beta and no credit where no organ is (the body and unmatched structures take no part).
    Returns (alpha/beta that gave the cumulative value, course maps, cumulative map, credit of that organ)."""
    m = masks()
    eq = {c: eqd2_hand(doses[c], n, DEFAULT_AB) for c, n, _ in COURSES}
    cum = sum(eq.values())
    ab = np.full(SHAPE, DEFAULT_AB)
    credits = {c: np.zeros(SHAPE) for c, _, months in COURSES if months is not None}
    covered = np.zeros(SHAPE, bool)
    for key, (_, a, _, role, rec) in ORGANS.items():
        if role == "body":
            continue
        mk = m[key]
        e_o = {c: eqd2_hand(doses[c], n, a) for c, n, _ in COURSES}
        r_o = {c: (step_credit(months, TABLE) if rec else 0.0) for c, _, months in COURSES if months is not None}
        cum_o = sum((1.0 - r_o.get(c, 0.0)) * e_o[c] for c, _, _ in COURSES)
        for c, _, _ in COURSES:
            eq[c] = np.where(mk & ~covered, e_o[c], np.where(mk, np.maximum(eq[c], e_o[c]), eq[c]))
        take = mk & (~covered | (cum_o > cum))
        cum = np.where(take, cum_o, cum)
        ab = np.where(take, a, ab)
        for c in credits:
            credits[c] = np.where(take, r_o[c], credits[c])
        covered |= mk
    return ab, eq, cum, credits


def hand_structure_values(doses, key):
    """Per-structure cumulative EQD2 samples: the organ's own alpha/beta and credit on all its voxels."""
    _, a, bx, _, rec = ORGANS[key]
    mk = box(SHAPE, *bx)
    cum = np.zeros(int(mk.sum()))
    per = {}
    for c, n, months in COURSES:
        e = eqd2_hand(doses[c][mk], n, a)
        per[c] = e
        r = 0.0 if months is None or not rec else step_credit(months, TABLE)
        cum += (1.0 - r) * e
    return cum, per


def d_cc(values, x_cc):
    """Minimum dose of the hottest x cc, voxel-based: sorted decreasing, first voxel where volume >= x."""
    v = np.sort(values)[::-1]
    i = int(np.ceil(x_cc / VOXEL_CC - 1e-9)) - 1
    return float(v[i])


def corner_values(f, key):
    """``f`` (a function of x, y, z in mm) at the 8 corners of the organ's box (voxel faces, not centres).

    A convex function of position (EQD2 of a linear dose is convex) takes its maximum over the box at a corner."""
    (k0, k1), (j0, j1), (i0, i1) = ORGANS[key][2]
    xs = [ORIGIN[0] + SPACING[0] * (i - 0.5) for i in (i0, i1)]
    ys = [ORIGIN[1] + SPACING[1] * (j - 0.5) for j in (j0, j1)]
    zs = [ORIGIN[2] + SPACING[2] * (k - 0.5) for k in (k0, k1)]
    return np.array([f(x, y, z) for x in xs for y in ys for z in zs])


def box_centre(key):
    (k0, k1), (j0, j1), (i0, i1) = ORGANS[key][2]
    return (ORIGIN[0] + SPACING[0] * (i0 + i1 - 1) / 2, ORIGIN[1] + SPACING[1] * (j0 + j1 - 1) / 2,
            ORIGIN[2] + SPACING[2] * (k0 + k1 - 1) / 2)


def cumulative_of(key):
    """The organ's cumulative EQD2 as a function of position (own alpha/beta, own credit)."""
    _, a, _, _, rec = ORGANS[key]

    def f(x, y, z):
        tot = 0.0
        for c, n, months in COURSES:
            r = 0.0 if months is None or not rec else step_credit(months, TABLE)
            tot = tot + (1.0 - r) * eqd2_hand(DOSE_FUNCS[c](x, y, z), n, a)
        return tot
    return f


# ------------------------------------------------------------------------------------------ fixture

@pytest.fixture(scope="module")
def main_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("analytic")
    doses = hand_doses()
    for c, arr in doses.items():
        write_image(root / f"dose_{c}.nrrd", arr, ORIGIN, SPACING, units="Gy")
    write_image(root / "ct.nrrd", np.zeros(SHAPE, np.int16), ORIGIN, SPACING)
    for key, (name, _, bx, _, _) in ORGANS.items():
        write_image(root / "masks" / f"{name}.nrrd", box(SHAPE, *bx).astype(np.uint8), ORIGIN, SPACING)
    write_image(root / "masks" / f"{UNMATCHED[0]}.nrrd", box(SHAPE, *UNMATCHED[1]).astype(np.uint8), ORIGIN,
                SPACING)
    # Limits set from the hand values with a clear margin, so that the expected statuses do not depend on the
    # sampling convention of the metrics (voxel centres or sub-voxel samples: values differ by < 1 voxel layer).
    cord, _ = hand_structure_values(doses, "spinal_cord")
    bs, _ = hand_structure_values(doses, "brainstem")
    par, _ = hand_structure_values(doses, "parotid_l")
    cord_cur_corners = corner_values(lambda x, y, z: eqd2_hand(DOSE_FUNCS["c3"](x, y, z), 10, 2.0), "spinal_cord")
    n70 = int((cord >= 70).sum())
    assert n70 / cord.size == pytest.approx(0.4375)  # the case is built so V70Gy is a partial volume (56 voxels)
    # (passing limits >= 20 % above the value: clear of a warning band near the limit, if the protocol has one)
    limits = {"cord_d003": d_cc(cord, 0.03) - 5.0, "cord_dmax_cur": 1.2 * cord_cur_corners.max(),
              "cord_v70_cc": 0.3, "cord_v70_pct": 60.0,
              "bs_d1cc": 1.2 * d_cc(bs, 1.0), "par_dmean": par.mean() - 3.0}
    limits = {k: round(float(v), 3) for k, v in limits.items()}
    write_yaml(root / "protocol.yaml", protocol_dict(limits))
    write_yaml(root / "case.yaml", {
        "reference": {"image": "ct.nrrd", "structures": "masks"},
        "protocol": "protocol.yaml",
        "courses": [{"name": c, "dose": f"dose_{c}.nrrd", "fractions": n,
                     **({"interval_months": m} if m is not None else {})} for c, n, m in COURSES],
    })
    out = root / "out"
    # in-process for speed; real processes are exercised in test_case_and_cli.py and test_synthetic.py
    proc = CliRunner().invoke(main, ["run", str(root / "case.yaml"), "--output", str(out)])
    assert proc.exit_code == 0, proc.output
    results = json.loads((out / "results.json").read_text())
    return {"root": root, "out": out, "doses": doses, "results": results, "limits": limits, "proc": proc}


# ---------------------------------------------------------------------------------------- voxel maps

def test_course_eqd2_maps_every_voxel(main_case):
    doses = main_case["doses"]
    _, eq, _, _ = hand_maps(doses)
    for c, _, _ in COURSES:
        got, img = read_array(main_case["out"] / f"eqd2_{c}.nrrd")
        assert got.dtype == np.float32
        assert got.shape == SHAPE
        np.testing.assert_allclose(got, eq[c], atol=1e-3, rtol=0)


def test_cumulative_map_every_voxel(main_case):
    _, _, cum, _ = hand_maps(main_case["doses"])
    got, _ = read_array(main_case["out"] / "cumulative_eqd2.nrrd")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, cum, atol=1e-3, rtol=0)


def test_alpha_beta_map_overlap_max_rule(main_case):
    ab, _, _, _ = hand_maps(main_case["doses"])
    got, _ = read_array(main_case["out"] / "alpha_beta.nrrd")
    np.testing.assert_array_equal(got, ab.astype(np.float32))
    # spot checks by region: cord 2; cord∩brainstem 2.5 (the brainstem has no credit: its cumulative EQD2 is the
    # larger there), brainstem only 2.5, brainstem∩GTV and parotid∩GTV 10 (the uncredited GTV's EQD2 is larger),
    # GTV only 10,
    # body only (the body takes no part) and the unmatched structure: the protocol default 3.5
    assert got[1, 13, 9] == 2.0 and got[0, 13, 9] == DEFAULT_AB and got[7, 13, 9] == 2.5 and got[7, 16, 7] == 2.5 and got[7, 11, 7] == 10.0
    assert got[5, 5, 7] == 10.0 and got[5, 10, 14] == 10.0 and got[7, 10, 10] == 10.0
    assert got[5, 17, 2] == DEFAULT_AB and got[1, 1, 1] == DEFAULT_AB and got[0, 0, 19] == DEFAULT_AB


def test_cumulative_spot_values_written_out(main_case):
    """A few voxels with the arithmetic spelled out (independent of the array code above)."""
    got, _ = read_array(main_case["out"] / "cumulative_eqd2.nrrd")

    def dose(c, k, j, i):
        return float(main_case["doses"][c][k, j, i])

    def e(D, n, ab):
        return D * (D / n + ab) / (2 + ab)

    # cord only (k1, j13, i9): ab 2, credit 50 % (14 months) on c1, 25 % (8 months) on c2, none on c3
    k, j, i = 1, 13, 9
    exp = 0.5 * e(dose("c1", k, j, i), 33, 2) + 0.75 * e(dose("c2", k, j, i), 25, 2) + e(dose("c3", k, j, i), 10, 2)
    assert got[k, j, i] == pytest.approx(exp, abs=1e-3)
    # cord ∩ brainstem (k7, j13, i9): the larger of the cord's value (ab 2, credit 50 % / 25 %) and the
    # brainstem's (ab 2.5, no credit)
    k, j, i = 7, 13, 9
    cord = 0.5 * e(dose("c1", k, j, i), 33, 2) + 0.75 * e(dose("c2", k, j, i), 25, 2) + e(dose("c3", k, j, i), 10, 2)
    bstem = e(dose("c1", k, j, i), 33, 2.5) + e(dose("c2", k, j, i), 25, 2.5) + e(dose("c3", k, j, i), 10, 2.5)
    assert bstem > cord + 1.0
    assert got[k, j, i] == pytest.approx(max(cord, bstem), abs=1e-3)
    # parotid only (k2, j3, i3): ab 4, credit 50 % / 25 %
    k, j, i = 2, 3, 3
    exp = 0.5 * e(dose("c1", k, j, i), 33, 4) + 0.75 * e(dose("c2", k, j, i), 25, 4) + e(dose("c3", k, j, i), 10, 4)
    assert got[k, j, i] == pytest.approx(exp, abs=1e-3)
    # parotid ∩ GTV (k5, j5, i7): the larger of the parotid's (ab 4, credit 50 % / 25 %) and the GTV's (ab 10,
    # no credit)
    k, j, i = 5, 5, 7
    par = 0.5 * e(dose("c1", k, j, i), 33, 4) + 0.75 * e(dose("c2", k, j, i), 25, 4) + e(dose("c3", k, j, i), 10, 4)
    gtv = e(dose("c1", k, j, i), 33, 10) + e(dose("c2", k, j, i), 25, 10) + e(dose("c3", k, j, i), 10, 10)
    assert got[k, j, i] == pytest.approx(max(par, gtv), abs=1e-3)
    # cord ∩ External (body takes no part): cord's credit stays (k1, j14, i10)
    k, j, i = 1, 14, 10
    exp = 0.5 * e(dose("c1", k, j, i), 33, 2) + 0.75 * e(dose("c2", k, j, i), 25, 2) + e(dose("c3", k, j, i), 10, 2)
    assert got[k, j, i] == pytest.approx(exp, abs=1e-3)
    # unmatched structure ∩ External (k1, j1, i1): neither takes part: default ab 3.5, no credit
    k, j, i = 1, 1, 1
    exp = sum(e(dose(c, k, j, i), n, 3.5) for c, n, _ in COURSES)
    assert got[k, j, i] == pytest.approx(exp, abs=1e-3)


def test_recovery_only_on_prior_courses_and_named_organs(main_case):
    """Where the governing organ has credit, cumulative < its plain sum; the current course is never discounted."""
    doses = main_case["doses"]
    ab, eq, cum, credits = hand_maps(doses)
    got, _ = read_array(main_case["out"] / "cumulative_eqd2.nrrd")
    plain = sum(eqd2_hand(doses[c], n, ab) for c, n, _ in COURSES)   # same alpha/beta, no credit
    credited = credits["c1"] > 0
    assert credited.sum() > 0
    assert np.all(got[credited] < plain[credited] - 1.0)
    np.testing.assert_allclose(got[~credited], plain[~credited], atol=1e-3)
    # the current course's map is its plain EQD2 everywhere (no credit on it)
    cur, _ = read_array(main_case["out"] / "eqd2_c3.nrrd")
    np.testing.assert_allclose(cur, eq["c3"], atol=1e-3)
    # remove the current course (at the governing alpha/beta) from the cumulative: the discounted prior courses
    np.testing.assert_allclose(got - eqd2_hand(doses["c3"], 10, ab),
                               sum((1 - credits[c]) * eqd2_hand(doses[c], n, ab) for c, n, m in COURSES
                                   if m is not None), atol=2e-3)


def test_output_geometry_is_the_dose_grid(main_case):
    for name in ["cumulative_eqd2.nrrd", "alpha_beta.nrrd"] + [f"eqd2_{c}.nrrd" for c, _, _ in COURSES]:
        img = sitk.ReadImage(str(main_case["out"] / name))
        assert img.GetSize() == SIZE, name
        assert img.GetOrigin() == pytest.approx(ORIGIN), name
        assert img.GetSpacing() == pytest.approx(SPACING), name
        assert img.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1)), name
        assert img.GetPixelID() == sitk.sitkFloat32, name


# ------------------------------------------------------------------------------------ results.json

def structure(results, name):
    found = [s for s in results["structures"] if s["name"] == name]
    assert len(found) == 1, name
    return found[0]


@pytest.mark.parametrize("key", ["spinal_cord", "brainstem", "parotid_l", "gtv"])
def test_structure_metrics_in_gradients(main_case, key):
    """Box organs in linear dose gradients. Exact where the sampling convention cannot matter (volume; mean of a
    linear physical dose = the dose at the box centre); bounded otherwise: the voxel-centre maximum <= Dmax <= the
    maximum at the box corners; cumulative Dmean within 0.05 Gy of the voxel-centre mean (EQD2 is quadratic in
    dose: averaging over sub-voxel samples adds at most (dose step)^2 / (12 n (2 + ab)) ~ 0.01 Gy here)."""
    name, a, bx, _, _ = ORGANS[key]
    s = structure(main_case["results"], name)
    assert s["organ"] == key
    n_vox = int(box(SHAPE, *bx).sum())
    assert s["volume_cc"] == pytest.approx(n_vox * VOXEL_CC, rel=1e-6)
    cum, per = hand_structure_values(main_case["doses"], key)
    mc = s["metrics"]["cumulative"]
    corners = corner_values(cumulative_of(key), key)
    assert cum.max() - 1e-3 <= mc["Dmax"] <= corners.max() + 1e-3
    assert mc["Dmean"] == pytest.approx(cum.mean(), abs=0.05)
    assert mc["Dmin"] <= mc["Dmean"] <= mc["D0.03cc"] <= mc["Dmax"]
    # D0.03cc lies between the hand value at the 4th hottest voxel centre (0.03 / 0.008 = 3.75 voxels) and Dmax
    assert d_cc(cum, 0.03) - 0.5 <= mc["D0.03cc"] <= mc["Dmax"]
    centre = box_centre(key)
    for c, n, _ in COURSES:
        m = s["metrics"][c]
        assert per[c].max() - 1e-3 <= m["Dmax"], c
        assert m["Dmean"] == pytest.approx(per[c].mean(), abs=0.05), c
        # physical dose: linear, so its mean over a symmetric box is the dose at the centre
        assert s["metrics_physical"][c]["Dmean"] == pytest.approx(DOSE_FUNCS[c](*centre), abs=1e-3), c


def test_unmatched_structures_listed(main_case):
    r = main_case["results"]
    assert r["unmatched_structures"] == ["Mystery"]
    s = structure(r, "Mystery")
    assert s["organ"] is None
    # reported with the protocol default alpha/beta
    assert s["alpha_beta"] == DEFAULT_AB
    mk = box(SHAPE, *UNMATCHED[1])
    cum = sum(eqd2_hand(main_case["doses"][c][mk], n, DEFAULT_AB) for c, n, _ in COURSES)
    assert s["metrics"]["cumulative"]["Dmean"] == pytest.approx(cum.mean(), abs=0.05)
    assert any("Mystery" in w for w in r["warnings"])
    # an unmatched structure gets no constraint
    assert not any(c["structure"] == "Mystery" for c in r["constraints"])


def constraint(results, organ, metric, scope="cumulative", unit=None):
    found = [c for c in results["constraints"] if c["organ"] == organ and c["metric"] == metric
             and c["scope"] == scope and (unit is None or c["unit"] == unit)]
    assert len(found) == 1, (organ, metric, scope)
    return found[0]


def test_constraint_statuses(main_case):
    r, lim = main_case["results"], main_case["limits"]
    cord = structure(r, "SpinalCord")
    c = constraint(r, "spinal_cord", "D0.03cc")
    assert c["status"] == "fail" and c["structure"] == "SpinalCord"
    assert c["value"] == pytest.approx(cord["metrics"]["cumulative"]["D0.03cc"], abs=1e-6)
    assert c["limit"] == lim["cord_d003"] and c["unit"] == "Gy"
    assert c["margin"] == pytest.approx(c["limit"] - c["value"], abs=1e-5)
    assert c["verified"] is True and c["source"] == "test D0.03cc"
    # judged on the credited sum (its basis); the plain sum of the courses is reported beside it
    assert c["basis"] == "credited" and c["value_credited"] == c["value"]
    plain = sum(eqd2_hand(main_case["doses"][cn][masks()["spinal_cord"]], n, 2.0) for cn, n, _ in COURSES)
    assert d_cc(plain, 0.03) - 0.5 <= c["value_undiscounted"] <= plain.max() + 2.0
    assert c["value_undiscounted"] > c["value"] + 10.0   # 50 % / 25 % credit on 2 prior courses: a large gap
    assert c["value_undiscounted"] == pytest.approx(cord["cumulative_undiscounted"]["D0.03cc"], abs=1e-6)
    # current scope: the current course's EQD2 alone (organ alpha/beta 2, no credit)
    c = constraint(r, "spinal_cord", "Dmax", scope="current")
    assert c["status"] == "pass" and c["verified"] is False
    assert c["value"] == pytest.approx(cord["metrics"]["c3"]["Dmax"], abs=1e-6)
    cur = eqd2_hand(main_case["doses"]["c3"][masks()["spinal_cord"]], 10, 2.0)
    assert c["value"] >= cur.max() - 1e-3
    # V70Gy in cc (fails: 56 of 128 voxels = 0.448 cc > 0.3 cc) and in percent (passes: 43.75 % < 60 %)
    c = constraint(r, "spinal_cord", "V70Gy", unit="cc")
    assert c["status"] == "fail" and c["value"] == pytest.approx(0.448, abs=0.07)
    cc_value = c["value"]
    c = constraint(r, "spinal_cord", "V70Gy", unit="%")
    assert c["status"] == "pass" and c["limit"] == 60.0
    assert c["value"] == pytest.approx(100.0 * cc_value / cord["volume_cc"], abs=1e-3)
    # no limit yet
    c = constraint(r, "brainstem", "Dmean")
    assert c["status"] == "no_limit" and c["limit"] is None and c["verified"] is False
    assert c["value"] == pytest.approx(structure(r, "brainstem")["metrics"]["cumulative"]["Dmean"], abs=1e-6)
    assert constraint(r, "brainstem", "D1cc")["status"] == "pass"
    c = constraint(r, "parotid_l", "Dmean")
    par, _ = hand_structure_values(main_case["doses"], "parotid_l")
    assert c["status"] == "fail" and c["value"] == pytest.approx(par.mean(), abs=0.05)
    # absent structure
    c = constraint(r, "optic_chiasm", "D0.03cc")
    assert c["status"] == "not_evaluated" and c["structure"] is None and c["value"] is None


def test_results_json_required_keys(main_case):
    r = main_case["results"]
    for key in ("software", "protocol", "assumptions", "structures", "constraints", "unmatched_structures",
                "warnings"):
        assert key in r, key
    assert r["software"]["name"] and r["software"]["version"]
    assert r["protocol"]["name"] == "Analytic test protocol" and r["protocol"]["version"] == "7.3"
    courses = {c["name"]: c for c in r["assumptions"]["courses"]}
    assert [c["name"] for c in r["assumptions"]["courses"]] == ["c1", "c2", "c3"]
    assert courses["c1"]["fractions"] == 33 and courses["c1"]["interval_months"] == 14
    assert courses["c2"]["fractions"] == 25 and courses["c2"]["interval_months"] == 8
    assert courses["c3"]["fractions"] == 10 and courses["c3"]["interval_months"] is None
    # recovery applied per organ, prior courses only
    assert courses["c1"]["recovery_applied"] == {"spinal_cord": 0.5, "parotid_l": 0.5}
    assert courses["c2"]["recovery_applied"] == {"spinal_cord": 0.25, "parotid_l": 0.25}
    assert not any(courses["c3"]["recovery_applied"].values())
    per_organ = r["assumptions"]["alpha_beta"]["per_organ"]
    assert per_organ["spinal_cord"]["alpha_beta_gy"] == 2.0 and per_organ["parotid_l"]["alpha_beta_gy"] == 4.0
    assert r["assumptions"]["model"]  # the model's stated assumptions
    assert any("repair" in a for a in r["assumptions"]["model"])
    for s in r["structures"]:
        for key in ("name", "organ", "volume_cc", "metrics"):
            assert key in s
        assert set(s["metrics"]) == {"cumulative", "c1", "c2", "c3"}
    for c in r["constraints"]:
        for key in ("organ", "structure", "metric", "scope", "value", "limit", "unit", "status", "source",
                    "verified"):
            assert key in c
    # the structure's recovery credit is the organ's own
    assert structure(r, "SpinalCord")["recovery_credit"] == {"c1": 0.5, "c2": 0.25}
    assert structure(r, "brainstem")["recovery_credit"] == {"c1": 0.0, "c2": 0.0}


def test_cli_prints_constraints_table(main_case):
    out = main_case["proc"].stdout
    assert "FAIL" in out and "pass" in out and "no_limit" in out and "not_evaluated" in out
    assert "Mystery" in out


# --------------------------------------------------------------- other grids: interpolation, grid: image

def linear_prior(x, y, z):
    return 40.0 + 0.5 * x - 0.25 * y + 0.3 * z


def linear_current(x, y, z):
    return 30.0 + 0.2 * x + 0.4 * y - 0.1 * z


def _grid_case(root, grid_mode):
    """CT 1.5 mm; current dose 2.5 mm; prior dose 3 mm; all axis-aligned. Doses are linear in space, so linear
    interpolation is exact wherever the evaluation voxel centres lie inside the dose grids."""
    ct = ((24, 20, 10), (-16.5, -14.25, -9.0), (1.5, 1.5, 2.0))           # x -16.5..18, y -14.25..14.25, z -9..9
    cur = ((16, 14, 9), (-18.75, -16.25, -10.0), (2.5, 2.5, 2.5))          # x -18.75..18.75, ...
    pri = ((16, 14, 10), (-24.0, -21.0, -15.0), (3.0, 3.0, 3.0))           # larger than both
    for name, (size, origin, spacing), f in (("dose_prior.nrrd", pri, linear_prior),
                                             ("dose_cur.nrrd", cur, linear_current)):
        x, y, z = coords(size, origin, spacing)
        write_image(root / name, f(x, y, z).astype(np.float32), origin, spacing, units="Gy")
    ct_size, ct_origin, ct_spacing = ct
    shape = (ct_size[2], ct_size[1], ct_size[0])
    write_image(root / "ct.nrrd", np.zeros(shape, np.int16), ct_origin, ct_spacing)
    write_image(root / "masks" / "Cord.nrrd", box(shape, (2, 8), (6, 14), (8, 16)).astype(np.uint8), ct_origin,
                ct_spacing)
    write_yaml(root / "protocol.yaml", {
        "name": "grid test", "version": "1", "alpha_beta": {"default": 3}, "recovery": {"model": "none"},
        "organs": {"spinal_cord": {"aliases": ["Cord"], "alpha_beta": 2}}})
    case = {"reference": {"image": "ct.nrrd", "structures": "masks"}, "protocol": "protocol.yaml",
            "courses": [{"name": "prior", "dose": "dose_prior.nrrd", "fractions": 30, "interval_months": 24},
                        {"name": "current", "dose": "dose_cur.nrrd", "fractions": 20}]}
    if grid_mode:
        case["grid"] = grid_mode
    write_yaml(root / "case.yaml", case)
    return {"ct": ct, "cur": cur, "pri": pri, "shape": shape}


def test_grid_image_uses_ct_grid(tmp_path):
    g = _grid_case(tmp_path, "image")
    r = CliRunner().invoke(main, ["run", str(tmp_path / "case.yaml"), "--output", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    size, origin, spacing = g["ct"]
    x, y, z = coords(size, origin, spacing)
    mask = box(g["shape"], (2, 8), (6, 14), (8, 16))
    ab = np.where(mask, 2.0, 3.0)
    exp_prior = eqd2_hand(linear_prior(x, y, z), 30, ab)
    exp_cur = eqd2_hand(linear_current(x, y, z), 20, ab)
    for name, exp in (("eqd2_prior.nrrd", exp_prior), ("eqd2_current.nrrd", exp_cur),
                      ("cumulative_eqd2.nrrd", exp_prior + exp_cur), ("alpha_beta.nrrd", ab)):
        img = sitk.ReadImage(str(tmp_path / "out" / name))
        assert img.GetSize() == size and img.GetSpacing() == pytest.approx(spacing)
        assert img.GetOrigin() == pytest.approx(origin)
        np.testing.assert_allclose(sitk.GetArrayFromImage(img), exp, atol=1e-3, rtol=0, err_msg=name)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    cord = structure(res, "Cord")
    assert cord["volume_cc"] == pytest.approx(mask.sum() * 1.5 * 1.5 * 2.0 / 1000, abs=1e-6)
    # Dmax between the hand value at the hottest voxel centre and at the hottest box corner (voxel faces)
    ci = [origin[0] + spacing[0] * (i - 0.5) for i in (8, 16)]
    cj = [origin[1] + spacing[1] * (j - 0.5) for j in (6, 14)]
    ck = [origin[2] + spacing[2] * (k - 0.5) for k in (2, 8)]
    corner = max(eqd2_hand(linear_prior(a, b, c), 30, 2.0) + eqd2_hand(linear_current(a, b, c), 20, 2.0)
                 for a in ci for b in cj for c in ck)
    dmax = cord["metrics"]["cumulative"]["Dmax"]
    assert (exp_prior + exp_cur)[mask].max() - 1e-3 <= dmax <= corner + 1e-3
    # the physical mean of a linear dose over the box is the dose at the box centre
    centre = [origin[0] + spacing[0] * 11.5, origin[1] + spacing[1] * 9.5, origin[2] + spacing[2] * 4.5]
    assert cord["metrics_physical"]["prior"]["Dmean"] == pytest.approx(linear_prior(*centre), abs=1e-3)
    assert cord["metrics_physical"]["current"]["Dmean"] == pytest.approx(linear_current(*centre), abs=1e-3)


def test_grid_dose_default_resamples_prior_onto_current_dose_grid(tmp_path):
    g = _grid_case(tmp_path, None)
    r = CliRunner().invoke(main, ["run", str(tmp_path / "case.yaml"), "--output", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    size, origin, spacing = g["cur"]
    x, y, z = coords(size, origin, spacing)
    img = sitk.ReadImage(str(tmp_path / "out" / "eqd2_prior.nrrd"))
    assert img.GetSize() == size and img.GetSpacing() == pytest.approx(spacing)
    assert img.GetOrigin() == pytest.approx(origin)
    ab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "alpha_beta.nrrd")))
    assert set(np.unique(ab)) <= {2.0, 3.0}
    # linear interpolation of a linear dose is exact; EQD2 with the map's alpha/beta voxel by voxel
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), eqd2_hand(linear_prior(x, y, z), 30, ab), atol=1e-3)
    cur = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "eqd2_current.nrrd")))
    np.testing.assert_allclose(cur, eqd2_hand(linear_current(x, y, z), 20, ab), atol=1e-3)


def test_prior_dose_outside_its_grid_counts_as_zero_with_warning(tmp_path):
    """Prior dose grid covers only i < 10 of the evaluation grid: EQD2 0 beyond it, and a warning."""
    size, origin, spacing = (20, 10, 6), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0)
    shape = (6, 10, 20)
    write_image(tmp_path / "cur.nrrd", np.full(shape, 20.0, np.float32), origin, spacing, units="Gy")
    write_image(tmp_path / "pri.nrrd", np.full((6, 10, 10), 40.0, np.float32), origin, spacing, units="Gy")
    write_image(tmp_path / "m" / "Cord.nrrd", box(shape, (0, 6), (0, 10), (5, 15)).astype(np.uint8), origin,
                spacing)
    write_yaml(tmp_path / "p.yaml", {"name": "p", "version": "1", "alpha_beta": {"default": 3},
                                     "recovery": {"model": "none"},
                                     "organs": {"spinal_cord": {"aliases": ["Cord"], "alpha_beta": 2}}})
    write_yaml(tmp_path / "case.yaml", {"reference": {"structures": "m"}, "protocol": "p.yaml",
                                        "courses": [{"name": "a", "dose": "pri.nrrd", "fractions": 20,
                                                     "interval_months": 3},
                                                    {"name": "b", "dose": "cur.nrrd", "fractions": 10}]})
    r = CliRunner().invoke(main, ["run", str(tmp_path / "case.yaml"), "--output", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "eqd2_a.nrrd")))
    ab = np.full(shape, 3.0)
    ab[:, :, 5:15] = 2.0
    exp = eqd2_hand(np.where(np.arange(20) < 10, 40.0, 0.0)[None, None, :] * np.ones(shape), 20, ab)
    np.testing.assert_allclose(a, exp, atol=1e-3)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert any("Cord" in w and "outside the dose grid" in w for w in res["warnings"])


# ------------------------------------------- uniform doses on known boxes: metrics exact under any convention

U_SIZE, U_ORIGIN, U_SPACING = (20, 20, 10), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0)
U_SHAPE = (10, 20, 20)
# (name, box (k, j, i)) - Cord and GTVp left of the dose step (i < 10), Parotid_L right, Brainstem astride it
U_STRUCTURES = {
    "Cord": ((2, 8), (3, 8), (2, 7)),            # 150 voxels = 1.200 cc
    "GTVp": ((2, 5), (3, 8), (2, 7)),            # overlaps the cord's lower half
    "Parotid_L": ((2, 8), (11, 17), (13, 18)),   # 180 voxels = 1.440 cc
    "Brainstem": ((2, 8), (11, 17), (5, 15)),    # 360 voxels = 2.880 cc, half each side; overlaps Parotid_L
    "Cochlea_L": ((5, 6), (5, 6), (5, 6)),       # one voxel = 0.008 cc
}


def uniform_case(root):
    """Prior course: 66 Gy / 30 fx for i < 10, 30 Gy / 30 fx for i >= 10, 9 months before (25 % credit on the
    cord). Current course: 45 Gy / 15 fx everywhere."""
    prior = np.full(U_SHAPE, 30.0, np.float32)
    prior[:, :, :10] = 66.0
    write_image(root / "prior.nrrd", prior, U_ORIGIN, U_SPACING, units="Gy")
    write_image(root / "current.nrrd", np.full(U_SHAPE, 45.0, np.float32), U_ORIGIN, U_SPACING, units="Gy")
    for name, bx in U_STRUCTURES.items():
        write_image(root / "masks" / f"{name}.nrrd", box(U_SHAPE, *bx).astype(np.uint8), U_ORIGIN, U_SPACING)

    def con(metric, scope, limit, key="limit_gy", basis="credited"):
        return {"metric": metric, key: limit, "scope": scope, "source": "uniform test", "verified": False,
                **({"basis": basis} if scope == "cumulative" and basis else {})}
    write_yaml(root / "protocol.yaml", {
        "name": "uniform", "version": "1", "alpha_beta": {"default": 3},
        "recovery": {"model": "step", "table": [{"min_months": m, "fraction": f} for m, f in TABLE],
                     "organs": ["spinal_cord"]},
        "organs": {
            "spinal_cord": {"aliases": ["Cord"], "alpha_beta": 2, "constraints": [
                con("D0.03cc", "cumulative", 108.0), con("D0.03cc", "current", 80.0),
                con("Dmean", "cumulative", 130.0),
                con("Dmax", "cumulative", 120.0, basis=None)]},   # no basis given: judged undiscounted
            "parotid_l": {"aliases": ["Parotid_L"], "alpha_beta": 3, "constraints": [
                con("Dmean", "cumulative", 100.0), con("V50Gy", "cumulative", 1.0, "limit_cc"),
                con("V70Gy", "cumulative", 2.0, "limit_cc"), con("V80Gy", "cumulative", 10.0, "limit_percent")]},
            "brainstem": {"aliases": ["Brainstem"], "alpha_beta": 2, "constraints": [
                con("D0.03cc", "cumulative", None), con("V100Gy", "cumulative", 40.0, "limit_percent")]},
            "cochlea_l": {"aliases": ["Cochlea_L"], "alpha_beta": 3, "constraints": [
                con("D0.03cc", "cumulative", 200.0), con("Dmax", "cumulative", 100.0)]},
            "optic_chiasm": {"aliases": ["OpticChiasm"], "alpha_beta": 2, "constraints": [
                con("D0.03cc", "cumulative", 54.0)]},
            "gtv": {"role": "target", "aliases": ["GTVp"], "alpha_beta": 10},
        }})
    write_yaml(root / "case.yaml", {
        "reference": {"structures": "masks"}, "protocol": "protocol.yaml",
        "courses": [{"name": "prior", "dose": "prior.nrrd", "fractions": 30, "interval_months": 9},
                    {"name": "current", "dose": "current.nrrd", "fractions": 15}]})


@pytest.fixture(scope="module")
def uniform_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("uniform")
    uniform_case(root)
    r = CliRunner().invoke(main, ["run", str(root / "case.yaml"), "--output", str(root / "out")])
    assert r.exit_code == 0, r.output
    return json.loads((root / "out" / "results.json").read_text()), root / "out"


# hand values (Gy):  EQD2 = D (D/n + ab) / (2 + ab)
#   prior 66 Gy / 30 fx (2.2 Gy/fx):  ab 2 -> 66 * 4.2 / 4 = 69.3      ab 3 -> 66 * 5.2 / 5 = 68.64
#   prior 30 Gy / 30 fx (1.0 Gy/fx):  ab 2 -> 30 * 3 / 4 = 22.5        ab 3 -> 30 * 4 / 5 = 24.0
#   current 45 Gy / 15 fx (3 Gy/fx):  ab 2 -> 45 * 5 / 4 = 56.25       ab 3 -> 45 * 6 / 5 = 54.0
CORD_CUM = 0.75 * 69.3 + 56.25          # 108.225 (25 % credit on the prior course: 9 months)
PAROTID_CUM = 24.0 + 54.0               # 78.0 (no credit: not a recovery organ)
BS_LEFT, BS_RIGHT = 69.3 + 56.25, 22.5 + 56.25   # 125.55 and 78.75 (no credit)
COCHLEA_CUM = 68.64 + 54.0              # 122.64


def test_uniform_structure_metrics_exact(uniform_results):
    r, _ = uniform_results
    cord = structure(r, "Cord")
    assert cord["volume_cc"] == pytest.approx(1.2, abs=1e-9)
    assert cord["alpha_beta"] == 2
    for m in ("Dmax", "Dmean", "Dmin", "D0.03cc"):
        assert cord["metrics"]["cumulative"][m] == pytest.approx(CORD_CUM, abs=1e-3), m
        assert cord["metrics"]["prior"][m] == pytest.approx(69.3, abs=1e-3), m       # before any credit
        assert cord["metrics"]["current"][m] == pytest.approx(56.25, abs=1e-3), m
        assert cord["metrics_physical"]["prior"][m] == pytest.approx(66.0, abs=1e-3), m
    par = structure(r, "Parotid_L")
    assert par["volume_cc"] == pytest.approx(1.44, abs=1e-9)
    # own alpha/beta (3) on all its voxels, also where it overlaps the brainstem (map alpha/beta 2 there)
    for m in ("Dmax", "Dmean", "Dmin", "D0.03cc"):
        assert par["metrics"]["cumulative"][m] == pytest.approx(PAROTID_CUM, abs=1e-3), m
        assert par["metrics"]["current"][m] == pytest.approx(54.0, abs=1e-3), m
    assert par["metrics"]["cumulative"]["V50Gy"] == pytest.approx(1.44, abs=1e-6)
    assert par["metrics"]["cumulative"]["V70Gy"] == pytest.approx(1.44, abs=1e-6)
    assert par["metrics"]["cumulative"]["V80Gy"] == pytest.approx(0.0, abs=1e-9)
    bs = structure(r, "Brainstem")
    assert bs["volume_cc"] == pytest.approx(2.88, abs=1e-9)
    assert bs["metrics"]["cumulative"]["Dmax"] == pytest.approx(BS_LEFT, abs=1e-3)
    assert bs["metrics"]["cumulative"]["D0.03cc"] == pytest.approx(BS_LEFT, abs=1e-3)
    assert bs["metrics"]["cumulative"]["Dmin"] == pytest.approx(BS_RIGHT, abs=1e-3)
    # half the volume at 66 Gy, half at 30 Gy (the step is symmetric): physical mean 48 Gy
    assert bs["metrics_physical"]["prior"]["Dmean"] == pytest.approx(48.0, abs=1e-3)
    assert bs["metrics"]["cumulative"]["Dmean"] == pytest.approx((BS_LEFT + BS_RIGHT) / 2, abs=0.2)
    coch = structure(r, "Cochlea_L")
    assert coch["volume_cc"] == pytest.approx(0.008, abs=1e-9)
    assert coch["metrics"]["cumulative"]["Dmax"] == pytest.approx(COCHLEA_CUM, abs=1e-3)
    assert coch["metrics"]["cumulative"]["D0.03cc"] is None  # 0.03 cc > the structure's 0.008 cc


def test_uniform_recovery_credit_organ_vs_map(uniform_results):
    """The cord's metrics use its own credit on all its voxels; where the cord overlaps the GTV the map takes the
    larger of the cord's 108.225 Gy (ab 2, 25 % credit) and the GTV's 67.1 + 48.75 = 115.85 Gy (ab 10, no credit)."""
    r, out = uniform_results
    cum, _ = read_array(out / "cumulative_eqd2.nrrd")
    ab, _ = read_array(out / "alpha_beta.nrrd")
    assert cum[3, 5, 4] == pytest.approx(67.1 + 48.75, abs=1e-3)     # cord ∩ GTV: the GTV's value (ab 10)
    assert ab[3, 5, 4] == 10.0
    assert cum[6, 5, 4] == pytest.approx(CORD_CUM, abs=1e-3)    # cord only: 25 % credit
    # parotid ∩ brainstem: brainstem 22.5 + 56.25 = 78.75 (ab 2) > parotid 24 + 54 = 78 (ab 3): ab 2
    assert cum[6, 14, 14] == pytest.approx(BS_RIGHT, abs=1e-3)
    assert ab[6, 14, 14] == 2.0 and ab[6, 14, 16] == 3.0
    assert cum[6, 14, 17] == pytest.approx(PAROTID_CUM, abs=1e-3)  # parotid only: ab 3
    assert cum[0, 0, 0] == pytest.approx(68.64 + 54.0, abs=1e-3)   # no structure: default ab 3
    assert structure(r, "Cord")["metrics"]["cumulative"]["D0.03cc"] == pytest.approx(CORD_CUM, abs=1e-3)
    assert structure(r, "Cord")["recovery_credit"] == {"prior": 0.25}
    assert structure(r, "GTVp")["recovery_credit"] == {"prior": 0.0}
    gtv = structure(r, "GTVp")["metrics"]["cumulative"]
    assert gtv["Dmax"] == pytest.approx(66 * (2.2 + 10) / 12 + 45 * (3 + 10) / 12, abs=1e-3)  # 67.1 + 48.75


def test_uniform_constraint_statuses_exact(uniform_results):
    r, _ = uniform_results
    c = constraint(r, "spinal_cord", "D0.03cc")
    assert (c["status"], c["structure"]) == ("fail", "Cord")
    assert c["value"] == pytest.approx(CORD_CUM, abs=1e-3) and c["margin"] == pytest.approx(108.0 - CORD_CUM, abs=1e-3)
    c = constraint(r, "spinal_cord", "D0.03cc", scope="current")
    assert c["status"] == "pass" and c["value"] == pytest.approx(56.25, abs=1e-3)
    assert c["recovery_credit"] == {}  # current scope: no credit involved
    c = constraint(r, "spinal_cord", "Dmean")
    assert c["status"] == "pass" and c["value"] == pytest.approx(CORD_CUM, abs=1e-3)
    assert c["basis"] == "credited" and c["value_undiscounted"] == pytest.approx(69.3 + 56.25, abs=1e-3)
    # a cumulative limit without a stated basis is judged on the plain sum: 69.3 + 56.25 = 125.55 Gy > 120 Gy
    # fails, although the credited sum (108.225 Gy) is below it
    c = constraint(r, "spinal_cord", "Dmax")
    assert c["basis"] == "undiscounted" and c["status"] == "fail"
    assert c["value"] == pytest.approx(125.55, abs=1e-3) and c["value_undiscounted"] == c["value"]
    assert c["value_credited"] == pytest.approx(CORD_CUM, abs=1e-3)
    assert c["margin"] == pytest.approx(120.0 - 125.55, abs=1e-3)
    c = constraint(r, "parotid_l", "Dmean")
    assert c["status"] == "pass" and c["value"] == pytest.approx(78.0, abs=1e-3)
    c = constraint(r, "parotid_l", "V50Gy")
    assert c["status"] == "fail" and c["value"] == pytest.approx(1.44, abs=1e-6) and c["unit"] == "cc"
    c = constraint(r, "parotid_l", "V70Gy")
    assert c["status"] == "pass" and c["value"] == pytest.approx(1.44, abs=1e-6)
    c = constraint(r, "parotid_l", "V80Gy")
    assert c["status"] == "pass" and c["value"] == pytest.approx(0.0, abs=1e-9) and c["unit"] == "%"
    c = constraint(r, "brainstem", "D0.03cc")
    assert c["status"] == "no_limit" and c["value"] == pytest.approx(BS_LEFT, abs=1e-3)
    c = constraint(r, "brainstem", "V100Gy")
    # half the brainstem is above 100 Gy; the dose step is blurred over one voxel by interpolation: 50 +- 5 %
    assert c["status"] == "fail" and c["value"] == pytest.approx(50.0, abs=5.0) and c["unit"] == "%"
    c = constraint(r, "cochlea_l", "D0.03cc")
    assert c["status"] == "not_evaluated" and c["structure"] == "Cochlea_L" and c["value"] is None
    c = constraint(r, "cochlea_l", "Dmax")
    assert c["status"] == "fail" and c["value"] == pytest.approx(COCHLEA_CUM, abs=1e-3)
    c = constraint(r, "optic_chiasm", "D0.03cc")
    assert c["status"] == "not_evaluated" and c["structure"] is None
    statuses = {c["status"] for c in r["constraints"]}
    assert {"pass", "fail", "no_limit", "not_evaluated"} <= statuses


def test_rotated_dose_grid_geometry_and_values(tmp_path):
    """Current dose grid rotated 90 degrees about z (direction columns: i -> +y, j -> -x). Outputs keep that
    geometry; the prior dose (identity grid, linear in space) is interpolated exactly onto it."""
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)   # row-major 3x3
    size, origin, spacing = (12, 10, 6), (10.0, -10.0, -5.0), (2.0, 2.0, 2.0)
    shape = (size[2], size[1], size[0])
    img = sitk.GetImageFromArray(np.full(shape, 30.0, np.float32))
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetMetaData("units", "Gy")
    sitk.WriteImage(img, str(tmp_path / "cur.nrrd"))
    # voxel centres of the rotated grid: x = ox - 2 j, y = oy + 2 i, z = oz + 2 k
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    x, y, z = origin[0] - spacing[1] * j, origin[1] + spacing[0] * i, origin[2] + spacing[2] * k
    # prior dose on an identity grid covering x -15..15, y -15..20, z -10..5 (all centres inside it)
    p_size, p_origin, p_spacing = (16, 19, 9), (-15.0, -15.0, -10.0), (2.0, 2.0, 2.0)
    px, py, pz = coords(p_size, p_origin, p_spacing)
    write_image(tmp_path / "pri.nrrd", linear_prior(px, py, pz).astype(np.float32), p_origin, p_spacing,
                units="Gy")
    write_image(tmp_path / "m" / "Blob.nrrd", box((9, 19, 16), (2, 6), (5, 12), (4, 10)).astype(np.uint8),
                p_origin, p_spacing)
    write_yaml(tmp_path / "p.yaml", {"name": "p", "version": "1", "alpha_beta": {"default": 3},
                                     "recovery": {"model": "none"},
                                     "organs": {"spinal_cord": {"aliases": ["Cord"], "alpha_beta": 2}}})
    write_yaml(tmp_path / "case.yaml", {"reference": {"structures": "m"}, "protocol": "p.yaml",
                                        "courses": [{"name": "a", "dose": "pri.nrrd", "fractions": 25,
                                                     "interval_months": 20},
                                                    {"name": "b", "dose": "cur.nrrd", "fractions": 10}]})
    r = CliRunner().invoke(main, ["run", str(tmp_path / "case.yaml"), "--output", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    for name in ("eqd2_a.nrrd", "eqd2_b.nrrd", "cumulative_eqd2.nrrd", "alpha_beta.nrrd"):
        o = sitk.ReadImage(str(tmp_path / "out" / name))
        assert o.GetSize() == size and o.GetOrigin() == pytest.approx(origin), name
        assert o.GetSpacing() == pytest.approx(spacing) and o.GetDirection() == pytest.approx(direction), name
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "eqd2_a.nrrd")))
    np.testing.assert_allclose(a, eqd2_hand(linear_prior(x, y, z), 25, 3.0), atol=1e-3)
    cum = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "cumulative_eqd2.nrrd")))
    np.testing.assert_allclose(cum, eqd2_hand(linear_prior(x, y, z), 25, 3.0) + 30 * (3 + 3) / 5, atol=1e-3)


def test_fine_ct_structures_on_coarser_dose_grid(tmp_path):
    """Structures on a 1 mm CT, dose on an aligned 2 mm grid (each dose voxel = 2 x 2 x 2 CT voxels). A box of whole
    dose voxels maps exactly: alpha/beta 2 on dose voxels [2:5]^3, default elsewhere. The file name 'spinal CORD'
    matches the alias 'Spinal Cord' case-insensitively."""
    ct_origin, ct_spacing, ct_shape = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (10, 20, 20)
    d_origin, d_spacing, d_shape = (0.5, 0.5, 0.5), (2.0, 2.0, 2.0), (5, 10, 10)
    write_image(tmp_path / "ct.nrrd", np.zeros(ct_shape, np.int16), ct_origin, ct_spacing)
    write_image(tmp_path / "m" / "spinal CORD.nrrd", box(ct_shape, (4, 10), (4, 10), (4, 10)).astype(np.uint8),
                ct_origin, ct_spacing)
    dose = np.full(d_shape, 33.0, np.float32)       # 33 Gy / 10 fx = 3.3 Gy per fraction
    write_image(tmp_path / "dose.nrrd", dose, d_origin, d_spacing, units="Gy")
    write_yaml(tmp_path / "p.yaml", {"name": "p", "version": "1", "alpha_beta": {"default": 3},
                                     "recovery": {"model": "none"},
                                     "organs": {"spinal_cord": {"aliases": ["Spinal Cord"], "alpha_beta": 2}}})
    write_yaml(tmp_path / "case.yaml", {"reference": {"image": "ct.nrrd", "structures": "m"}, "protocol": "p.yaml",
                                        "courses": [{"name": "only", "dose": "dose.nrrd", "fractions": 10}]})
    r = CliRunner().invoke(main, ["run", str(tmp_path / "case.yaml"), "--output", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    ab, img = read_array(tmp_path / "out" / "alpha_beta.nrrd")
    assert img.GetSpacing() == pytest.approx(d_spacing) and img.GetOrigin() == pytest.approx(d_origin)
    exp = np.full(d_shape, 3.0)
    exp[2:5, 2:5, 2:5] = 2.0
    np.testing.assert_array_equal(ab, exp)
    cum, _ = read_array(tmp_path / "out" / "cumulative_eqd2.nrrd")
    # 33 (3.3 + 2) / 4 = 43.725 Gy in the cord; 33 (3.3 + 3) / 5 = 41.58 Gy elsewhere
    np.testing.assert_allclose(cum, np.where(exp == 2.0, 43.725, 41.58), atol=1e-3)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    s = structure(res, "spinal CORD")
    assert s["organ"] == "spinal_cord" and res["unmatched_structures"] == []
    assert s["volume_cc"] == pytest.approx(216 * 0.001, abs=1e-9)   # 6 x 6 x 6 CT voxels of 1 mm^3
    assert s["metrics"]["cumulative"]["Dmean"] == pytest.approx(43.725, abs=1e-3)

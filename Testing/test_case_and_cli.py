"""The command line on good and bad inputs: exit codes, one-line errors naming the file and field, no traceback,
nothing half-written; output directory rules; case-file validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from analytic import box, run_cli, write_image, write_yaml
from ReirradiationNPCLib import __version__
from ReirradiationNPCLib.case import load_case
from ReirradiationNPCLib.cli import main
from ReirradiationNPCLib.errors import InputError

SHAPE = (5, 10, 10)
ORIGIN, SPACING = (0.0, 0.0, 0.0), (2.0, 2.0, 2.0)

PROTOCOL = {"name": "small", "version": "1", "alpha_beta": {"default": 3}, "recovery": {"model": "none"},
            "organs": {"spinal_cord": {"aliases": ["Cord"], "alpha_beta": 2, "constraints": [
                {"metric": "D0.03cc", "limit_gy": 67.75, "scope": "cumulative", "source": "Nieder 2006",
                 "verified": True}]}}}


def make_case(root, case_edit=None, protocol_edit=None, prior=None, current=None):
    """A small valid two-course case in ``root``; the edits change the case / protocol dicts before writing."""
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / "dose1.nrrd", np.full(SHAPE, 40.0, np.float32) if prior is None else prior, ORIGIN,
                SPACING, units="Gy")
    write_image(root / "dose2.nrrd", np.full(SHAPE, 30.0, np.float32) if current is None else current, ORIGIN,
                SPACING, units="Gy")
    write_image(root / "masks" / "Cord.nrrd", box(SHAPE, (1, 4), (2, 6), (2, 6)).astype(np.uint8), ORIGIN, SPACING)
    protocol = json.loads(json.dumps(PROTOCOL))
    if protocol_edit:
        protocol_edit(protocol)
    write_yaml(root / "protocol.yaml", protocol)
    case = {"reference": {"structures": "masks"}, "protocol": "protocol.yaml",
            "courses": [{"name": "first", "dose": "dose1.nrrd", "fractions": 20, "interval_months": 18},
                        {"name": "second", "dose": "dose2.nrrd", "fractions": 15}]}
    if case_edit:
        case_edit(case)
    return write_yaml(root / "case.yaml", case)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_bad_input(result, *needles, out_dir=None):
    """Exit 2, exactly one line on stderr naming what is wrong, no traceback, no results.json."""
    stderr = result.stderr
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    if out_dir is not None:
        assert not (out_dir / "results.json").exists()
    return lines[0]


# ------------------------------------------------------------------------------------------ good runs

def test_help_and_version():
    r = invoke("--help")
    assert r.exit_code == 0 and "run" in r.stdout and "demo" in r.stdout and "protocol" in r.stdout
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.stdout
    r = invoke("run", "--help")
    assert r.exit_code == 0 and "--output" in r.stdout and "--overwrite" in r.stdout


def test_small_case_runs_and_hand_values(tmp_path):
    case = make_case(tmp_path / "case")
    out = tmp_path / "out"
    r = invoke("run", case, "--output", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    cord = [s for s in res["structures"] if s["name"] == "Cord"][0]
    # 40 Gy / 20 fx = 2 Gy/fx -> EQD2 40 for any ab; 30 Gy / 15 fx = 2 Gy/fx -> 30: cumulative 70 Gy
    assert cord["metrics"]["cumulative"]["Dmax"] == pytest.approx(70.0, abs=1e-3)
    c = res["constraints"][0]
    assert c["status"] == "fail" and c["value"] == pytest.approx(70.0, abs=1e-3) and c["limit"] == 67.75


def test_output_directory_in_use(tmp_path):
    case = make_case(tmp_path / "case")
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    assert_bad_input(invoke("run", case, "--output", out), str(out), "--overwrite", out_dir=out)
    assert (out / "something.txt").read_text() == "keep me"
    r = invoke("run", case, "--output", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "results.json").is_file() and (out / "cumulative_eqd2.nrrd").is_file()
    # a second run into the same folder needs --overwrite again
    assert_bad_input(invoke("run", case, "--output", out), "--overwrite")
    assert (out / "results.json").is_file()  # refusing did not touch the previous results


def test_output_path_is_a_file(tmp_path):
    case = make_case(tmp_path / "case")
    f = tmp_path / "out.txt"
    f.write_text("x")
    assert_bad_input(invoke("run", case, "--output", f), str(f))


def test_failed_rerun_with_overwrite_leaves_no_results_json(tmp_path):
    out = tmp_path / "out"
    good = make_case(tmp_path / "good")
    assert invoke("run", good, "--output", out).exit_code == 0
    assert (out / "results.json").exists()
    dose = np.full(SHAPE, 30.0, np.float32)
    dose[2, 3, 3] = np.nan
    bad = make_case(tmp_path / "bad", current=dose)
    assert_bad_input(invoke("run", bad, "--output", out, "--overwrite"), "dose2.nrrd", out_dir=out)
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


# ------------------------------------------------------------------------------------------ bad inputs

def _del_fractions(case):
    del case["courses"][0]["fractions"]


def _zero_fractions(case):
    case["courses"][1]["fractions"] = 0


def _fraction_text(case):
    case["courses"][1]["fractions"] = "thirty"


def _del_interval(case):
    del case["courses"][0]["interval_months"]


def _negative_interval(case):
    case["courses"][0]["interval_months"] = -3


def _unknown_case_key(case):
    case["couses"] = []


def _unknown_course_key(case):
    case["courses"][0]["fraction"] = 20


def _missing_dose_file(case):
    case["courses"][0]["dose"] = "no_such_dose.nrrd"


def _unknown_protocol_name(case):
    case["protocol"] = "no-such-protocol"


def _bad_grid(case):
    case["grid"] = "ct"


def _grid_image_without_image(case):
    case["grid"] = "image"


def _duplicate_course_names(case):
    case["courses"][1]["name"] = "first"


def _unsupported_registration(case):
    case["courses"][0]["registration"] = {"method": "magic"}


CASE_ERRORS = [
    (_del_fractions, ["case.yaml", "courses[0].fractions", "missing"]),
    (_zero_fractions, ["case.yaml", "courses[1].fractions"]),
    (_fraction_text, ["case.yaml", "courses[1].fractions"]),
    (_del_interval, ["case.yaml", "courses[0].interval_months", "missing"]),
    (_negative_interval, ["case.yaml", "courses[0].interval_months"]),
    (_unknown_case_key, ["case.yaml", "couses", "unknown key"]),
    (_unknown_course_key, ["case.yaml", "courses[0].fraction", "unknown key"]),
    (_missing_dose_file, ["no_such_dose.nrrd", "courses[0].dose", "not found"]),
    (_unknown_protocol_name, ["no-such-protocol", "protocol"]),
    (_bad_grid, ["case.yaml", "grid"]),
    (_grid_image_without_image, ["case.yaml", "reference.image"]),
    (_duplicate_course_names, ["case.yaml", "courses[1].name"]),
    (_unsupported_registration, ["case.yaml", "courses[0].registration.method"]),
]


@pytest.mark.parametrize("edit, needles", CASE_ERRORS, ids=[e.__name__.strip("_") for e, _ in CASE_ERRORS])
def test_bad_case_file(tmp_path, edit, needles):
    case = make_case(tmp_path / "case", case_edit=edit)
    assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), *needles, out_dir=tmp_path / "out")


def _ab_zero(p):
    p["alpha_beta"]["default"] = 0


def _ab_negative_organ(p):
    p["organs"]["spinal_cord"]["alpha_beta"] = -2


def _unknown_protocol_key(p):
    p["limits"] = {}


def _verified_without_limit(p):
    p["organs"]["spinal_cord"]["constraints"][0]["limit_gy"] = None


PROTOCOL_ERRORS = [
    (_ab_zero, ["protocol.yaml", "alpha_beta.default", "> 0"]),
    (_ab_negative_organ, ["protocol.yaml", "organs.spinal_cord.alpha_beta", "> 0"]),
    (_unknown_protocol_key, ["protocol.yaml", "limits", "unknown key"]),
    (_verified_without_limit, ["protocol.yaml", "organs.spinal_cord.constraints[0].verified"]),
]


@pytest.mark.parametrize("edit, needles", PROTOCOL_ERRORS, ids=[e.__name__.strip("_") for e, _ in PROTOCOL_ERRORS])
def test_bad_protocol(tmp_path, edit, needles):
    case = make_case(tmp_path / "case", protocol_edit=edit)
    assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), *needles, out_dir=tmp_path / "out")


@pytest.mark.parametrize("value, needle", [(np.nan, "NaN"), (np.inf, "infinite"), (-0.5, "negative"),
                                           (2000.0, "cGy")])
def test_bad_dose_values(tmp_path, value, needle):
    dose = np.full(SHAPE, 40.0, np.float32)
    dose[1, 2, 3] = value
    case = make_case(tmp_path / "case", prior=dose)
    line = assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), "dose1.nrrd", "courses[0].dose",
                            out_dir=tmp_path / "out")
    assert needle in line


def test_dose_file_not_an_image(tmp_path):
    case = make_case(tmp_path / "case")
    (tmp_path / "case" / "dose2.nrrd").write_text("this is not an image\n")
    assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), "dose2.nrrd", "courses[1].dose",
                     out_dir=tmp_path / "out")


def test_dose_file_is_a_text_file_with_txt_suffix(tmp_path):
    case = make_case(tmp_path / "case", case_edit=lambda c: c["courses"][0].update(dose="dose.txt"))
    (tmp_path / "case" / "dose.txt").write_text("40 40 40\n")
    assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), "dose.txt", "courses[0].dose",
                     out_dir=tmp_path / "out")


def test_dose_in_other_units_refused(tmp_path):
    case = make_case(tmp_path / "case")
    write_image(tmp_path / "case" / "dose1.nrrd", np.full(SHAPE, 40.0, np.float32), ORIGIN, SPACING, units="cGy")
    assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), "dose1.nrrd", "Gy",
                     out_dir=tmp_path / "out")


def test_grids_that_do_not_overlap(tmp_path):
    case = make_case(tmp_path / "case")
    # the prior dose 1 m away from the current dose grid
    write_image(tmp_path / "case" / "dose1.nrrd", np.full(SHAPE, 40.0, np.float32), (1000.0, 0.0, 0.0), SPACING,
                units="Gy")
    line = assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), "dose1.nrrd", "courses[0].dose",
                            out_dir=tmp_path / "out")
    assert "overlap" in line


def test_grid_image_does_not_overlap_current_dose(tmp_path):
    def edit(c):
        c["grid"] = "image"
        c["reference"]["image"] = "ct.nrrd"
    case = make_case(tmp_path / "case", case_edit=edit)
    write_image(tmp_path / "case" / "ct.nrrd", np.zeros(SHAPE, np.int16), (0.0, 500.0, 0.0), SPACING)
    line = assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), "dose", out_dir=tmp_path / "out")
    assert "overlap" in line


def test_structures_folder_missing(tmp_path):
    case = make_case(tmp_path / "case", case_edit=lambda c: c["reference"].update(structures="nowhere"))
    assert_bad_input(invoke("run", case, "--output", tmp_path / "out"), "nowhere", "reference.structures",
                     out_dir=tmp_path / "out")


def test_case_file_missing_or_unparsable(tmp_path):
    assert_bad_input(invoke("run", tmp_path / "nope.yaml", "--output", tmp_path / "out"), "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("courses: [unclosed\n")
    assert_bad_input(invoke("run", bad, "--output", tmp_path / "out"), "bad.yaml")


def test_case_json_accepted(tmp_path):
    case_yaml = make_case(tmp_path / "case")
    data = yaml.safe_load(case_yaml.read_text())
    case_json = tmp_path / "case" / "case.json"
    case_json.write_text(json.dumps(data))
    spec = load_case(case_json)
    assert [c.fractions for c in spec.courses] == [20, 15]
    assert spec.courses[0].interval_months == 18 and spec.courses[1].interval_months is None
    assert spec.courses[1].is_current and not spec.courses[0].is_current
    assert spec.grid == "dose"


def test_current_course_takes_no_interval(tmp_path):
    case = make_case(tmp_path / "case", case_edit=lambda c: c["courses"][1].update(interval_months=3))
    with pytest.raises(InputError) as ei:
        load_case(case)
    assert "courses[1].interval_months" in str(ei.value)


# -------------------------------------------------------------------- real processes (not CliRunner)

def test_real_process_bad_inputs(tmp_path):
    """The installed entry point as a real process: exit 2, one line on stderr, no traceback."""
    case = make_case(tmp_path / "a", case_edit=_del_fractions)
    p = run_cli("run", case, "--output", tmp_path / "out")
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert "courses[0].fractions" in p.stderr and str(case) in p.stderr
    dose = np.full(SHAPE, 40.0, np.float32)
    dose[0, 0, 0] = np.nan
    case = make_case(tmp_path / "b", prior=dose)
    p = run_cli("run", case, "--output", tmp_path / "out")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "dose1.nrrd" in p.stderr
    assert not (tmp_path / "out" / "results.json").exists()
    case = make_case(tmp_path / "c", protocol_edit=_ab_zero)
    p = run_cli("run", case, "--output", tmp_path / "out")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "alpha_beta.default" in p.stderr


def test_real_process_good_run_and_output_in_use(tmp_path):
    case = make_case(tmp_path / "case")
    out = tmp_path / "out"
    p = run_cli("run", case, "--output", out)
    assert p.returncode == 0, p.stderr
    assert "FAIL" in p.stdout and "spinal_cord" in p.stdout
    p = run_cli("run", case, "--output", out)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--overwrite" in p.stderr
    p = run_cli("--version")
    assert p.returncode == 0 and __version__ in p.stdout
    assert math.isfinite(json.loads((out / "results.json").read_text())["constraints"][0]["value"])


# ------------------------------------------------------------- recovery boundaries, one course, file formats

def _step_recovery(p):
    p["recovery"] = {"model": "step", "organs": ["spinal_cord"],
                     "table": [{"min_months": 0, "fraction": 0.0}, {"min_months": 6, "fraction": 0.25},
                               {"min_months": 12, "fraction": 0.5}]}


@pytest.mark.parametrize("months, credit", [(5.9, 0.0), (6, 0.25), (12, 0.5)])
def test_recovery_step_boundaries_through_the_cli(tmp_path, months, credit):
    """40 Gy / 20 fx (EQD2 40) then 30 Gy / 15 fx (EQD2 30): cord = (1 - r) 40 + 30; elsewhere 70."""
    case = make_case(tmp_path / "case", protocol_edit=_step_recovery,
                     case_edit=lambda c: c["courses"][0].update(interval_months=months))
    r = invoke("run", case, "--output", tmp_path / "out")
    assert r.exit_code == 0, r.output
    cum = __import__("SimpleITK").GetArrayFromImage(
        __import__("SimpleITK").ReadImage(str(tmp_path / "out" / "cumulative_eqd2.nrrd")))
    cord = box(SHAPE, (1, 4), (2, 6), (2, 6))
    np.testing.assert_allclose(cum[cord], (1 - credit) * 40 + 30, atol=1e-3)
    np.testing.assert_allclose(cum[~cord], 70.0, atol=1e-3)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["assumptions"]["courses"][0]["recovery_applied"] == {"spinal_cord": credit}


def test_single_course_case(tmp_path):
    """Only the current course: the cumulative map is its EQD2. 30 Gy / 10 fx, ab 2 in the cord: 30 * 5 / 4."""
    def edit(c):
        c["courses"] = [{"name": "only", "dose": "dose2.nrrd", "fractions": 10}]
    case = make_case(tmp_path / "case", case_edit=edit)
    r = invoke("run", case, "--output", tmp_path / "out")
    assert r.exit_code == 0, r.output
    import SimpleITK as sitk
    cum = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "cumulative_eqd2.nrrd")))
    cord = box(SHAPE, (1, 4), (2, 6), (2, 6))
    np.testing.assert_allclose(cum[cord], 37.5, atol=1e-3)
    np.testing.assert_allclose(cum[~cord], 30 * (3 + 3) / 5, atol=1e-3)  # default ab 3: 36 Gy


def test_nifti_doses_and_slicer_segmentation(tmp_path):
    """Doses as NIfTI, structures as a Slicer .seg.nrrd (3D labelmap with Segment<i>_* metadata)."""
    import SimpleITK as sitk

    def edit(c):
        c["courses"][0]["dose"] = "dose1.nii.gz"
        c["courses"][1]["dose"] = "dose2.nii"
        c["reference"]["structures"] = "structures.seg.nrrd"
    case = make_case(tmp_path / "case", case_edit=edit)
    d = tmp_path / "case"
    write_image(d / "dose1.nii.gz", np.full(SHAPE, 66.0, np.float32), ORIGIN, SPACING)
    write_image(d / "dose2.nii", np.full(SHAPE, 45.0, np.float32), ORIGIN, SPACING)
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:4, 2:6, 2:6] = 1
    lab[0:2, 7:9, 7:9] = 2
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing(SPACING)
    for i, (name, value) in enumerate([("Cord", 1), ("Other", 2)]):
        img.SetMetaData(f"Segment{i}_ID", f"Segment_{i}")
        img.SetMetaData(f"Segment{i}_Name", name)
        img.SetMetaData(f"Segment{i}_LabelValue", str(value))
        img.SetMetaData(f"Segment{i}_Layer", "0")
    sitk.WriteImage(img, str(d / "structures.seg.nrrd"))
    r = invoke("run", case, "--output", tmp_path / "out")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    # 66 Gy / 20 fx (3.3 Gy/fx), ab 2: 66 * 5.3 / 4 = 87.45 ; 45 Gy / 15 fx, ab 2: 45 * 5 / 4 = 56.25
    cord = [s for s in res["structures"] if s["name"] == "Cord"][0]
    assert cord["volume_cc"] == pytest.approx(48 * 0.008, abs=1e-9)
    assert cord["metrics"]["cumulative"]["Dmean"] == pytest.approx(87.45 + 56.25, abs=1e-3)
    assert res["unmatched_structures"] == ["Other"]


def test_ctrl_c_inside_a_registration_callback_says_interrupted(tmp_path):
    """Ctrl-C while SimpleITK registers: Python raises KeyboardInterrupt inside the iteration callback and SimpleITK
    hands it back as its own RuntimeError ('error executing the Python Callable'), which the CLI called an internal
    error. Here the callback sends SIGINT to its own process (a real signal, in a fresh interpreter): one line
    'interrupted', exit 1, no 'internal error'."""
    import subprocess
    import sys

    from analytic import cli_env
    script = tmp_path / "ctrl_c.py"
    script.write_text(
        "import os, signal\n"
        "import numpy as np, SimpleITK as sitk\n"
        "from ReirradiationNPCLib import cli\n"
        "def go():\n"
        "    img = sitk.GetImageFromArray(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))\n"
        "    r = sitk.ImageRegistrationMethod()\n"
        "    r.SetMetricAsMeanSquares()\n"
        "    r.SetOptimizerAsGradientDescent(1.0, 50)\n"
        "    r.SetInitialTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)))\n"
        "    r.SetInterpolator(sitk.sitkLinear)\n"
        "    r.AddCommand(sitk.sitkIterationEvent, lambda: os.kill(os.getpid(), signal.SIGINT))\n"
        "    r.Execute(img, img)\n"
        "cli._guard(go, False)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "interrupted", out.stderr
    assert "internal error" not in out.stderr

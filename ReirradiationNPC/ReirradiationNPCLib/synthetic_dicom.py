"""The synthetic NPC case (see :mod:`synthetic`) written as DICOM RT, so the real DICOM path can be exercised.

Written into ``out_dir``:
- ``ct_current/`` and ``ct_prior/``: two CT series (two studies, two frames of reference); the prior CT shows
  the anatomy with the known rigid offset ``synthetic.KNOWN_PRIOR_OFFSET``;
- ``rtplan_course1.dcm`` (70 Gy / 33 fx, prior frame) and ``rtplan_course2.dcm`` (65 Gy / 54 fx, current frame);
- ``rtdose_course1.dcm``: the prior physical dose in the prior CT's frame (as the first planning system saw it);
  ``rtdose_course1_registered.dcm``: the same dose already in the current frame (for ``registration: identity``);
  ``rtdose_course2.dcm``: the current dose;
- ``rtstruct_current.dcm`` (External + organs + GTVp on the current CT) and ``rtstruct_prior.dcm`` (the same
  organs on the prior CT);
- ``reg_prior_to_current.dcm``: a Spatial Registration object holding the known rigid matrix (prior -> current,
  see :func:`dicom_export.write_spatial_registration` for the convention);
- case files: ``case_identity.yaml`` (prior dose already registered), ``case_reg.yaml`` (``method: file`` with the
  REG), ``case_rigid.yaml`` (``method: rigid`` with the prior CT) and ``case.yaml`` = the best one the installed
  case parser supports (rigid, else file, else identity).

SYNTHETIC DATA: not a patient, not for clinical use.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import yaml

from . import synthetic as syn
from .dicom_export import (new_uid, write_ct_series, write_rtdose, write_rtplan, write_rtstruct,
                           write_spatial_registration)
from .geometry import Volume
from .protocol import protocols_dir

log = logging.getLogger(__name__)

PATIENT = {"PatientName": "Synthetic^Phantom", "PatientID": "SYNTHETIC-NPC-001", "PatientBirthDate": "19700101",
           "PatientSex": "O"}
PRIOR_STUDY_DATE = "20230601"
CURRENT_STUDY_DATE = "20260115"

#: ROI colours (RGB 0-1) for the RTSTRUCTs
_COLORS = {"External": (0.6, 0.6, 0.6), "GTVp": (1.0, 0.0, 0.0)}


def _study(date: str, study_id: str, description: str) -> dict:
    return dict(PATIENT, StudyInstanceUID=new_uid(), StudyDate=date, StudyTime="090000", StudyID=study_id,
                AccessionNumber="", ReferringPhysicianName="", StudyDescription=description,
                FrameOfReferenceUID=new_uid(), SeriesInstanceUID=new_uid())


def known_prior_to_current_matrix() -> np.ndarray:
    """4x4 matrix mapping a prior-CT point q (LPS mm) to the current-CT point p = R^T (q - t)."""
    R, t = syn.prior_frame_transform()
    m = np.eye(4)
    m[:3, :3] = R.T
    m[:3, 3] = -R.T @ t
    return m


def _masks(grid, transform=None) -> tuple[list[np.ndarray], list[str], list[tuple]]:
    x, y, z = syn._coords(grid, transform) if transform is not None else syn._axes(grid)
    body = np.broadcast_to(syn._body(x, y, z), grid.shape).copy()
    masks, names, colors = [body], ["External"], [_COLORS["External"]]
    rng = np.random.default_rng(7)
    for name, shape in syn.STRUCTURES.items():
        masks.append(syn._inside(shape, x, y, z, grid.shape))
        names.append(name)
        colors.append(_COLORS.get(name, tuple(float(v) for v in rng.uniform(0.2, 1.0, 3))))
    return masks, names, colors


def generate_dicom(out_dir: Path, *, prior_structures: bool = True) -> Path:
    """Write the synthetic case as DICOM RT into ``out_dir``; return the path of ``case.yaml``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = syn.CT_GRID
    R, t = syn.prior_frame_transform()
    def to_current(q):                     # prior-frame point q -> current-frame point R^T (q - t)
        return np.einsum("na,ab->nb", q - t, R)

    cur = _study(CURRENT_STUDY_DATE, "CUR1", "SYNTHETIC re-irradiation planning")
    pri = _study(PRIOR_STUDY_DATE, "PRI1", "SYNTHETIC first course planning")
    ct_cur = Volume(syn.phantom_ct(g).astype(np.int16), g)
    cur_uids = write_ct_series(ct_cur, out_dir / "ct_current", dict(cur, _SeriesNumber=1),
                               series_description="SYNTHETIC current planning CT")
    ct_pri = Volume(syn.phantom_ct(g, transform=to_current, seed=syn.SEED + 1).astype(np.int16), g)
    pri_uids = write_ct_series(ct_pri, out_dir / "ct_prior", dict(pri, _SeriesNumber=1),
                               series_description="SYNTHETIC prior-course CT (known offset)")

    plan1 = write_rtplan(out_dir / "rtplan_course1.dcm", pri, fractions=syn.PRIOR_FRACTIONS, label="NPC 70/33",
                         prescription_gy=syn.PRIOR_DOSE_GY, series_description="SYNTHETIC first course plan")
    plan2 = write_rtplan(out_dir / "rtplan_course2.dcm", cur, fractions=syn.CURRENT_FRACTIONS, label="reRT 65/54",
                         prescription_gy=syn.CURRENT_DOSE_GY, series_description="SYNTHETIC re-irradiation plan")

    dg = syn.PRIOR_DOSE_GRID
    d1 = syn.prior_dose(in_prior_frame=True)  # the prior dose grid placed in the prior CT's frame
    write_rtdose(Volume(d1, dg), pri, out_dir / "rtdose_course1.dcm",
                 series_description="SYNTHETIC course 1 physical dose", referenced_plan_uids=[plan1])
    d1r = syn.prior_dose()
    write_rtdose(Volume(d1r.astype(np.float32), dg), cur, out_dir / "rtdose_course1_registered.dcm",
                 series_description="SYNTHETIC course 1 dose in current frame", referenced_plan_uids=[plan1])
    cg = syn.CURRENT_DOSE_GRID
    d2 = syn.current_dose()
    write_rtdose(Volume(d2.astype(np.float32), cg), cur, out_dir / "rtdose_course2.dcm",
                 series_description="SYNTHETIC course 2 physical dose", referenced_plan_uids=[plan2])

    ct_cur.meta["dicom"] = dict(cur, SOPInstanceUIDs=cur_uids)
    masks, names, colors = _masks(g)
    write_rtstruct(masks, names, colors, ct_cur, out_dir / "rtstruct_current.dcm", label="SYNTH_CUR",
                   series_description="SYNTHETIC structures (current CT)")
    if prior_structures:
        ct_pri.meta["dicom"] = dict(pri, SOPInstanceUIDs=pri_uids)
        masks, names, colors = _masks(g, transform=to_current)
        write_rtstruct(masks, names, colors, ct_pri, out_dir / "rtstruct_prior.dcm", label="SYNTH_PRI",
                       series_description="SYNTHETIC structures (prior CT)")
    del masks
    write_spatial_registration(out_dir / "reg_prior_to_current.dcm", cur, fixed_frame_uid=cur["FrameOfReferenceUID"],
                               moving_frame_uid=pri["FrameOfReferenceUID"],
                               moving_to_fixed=known_prior_to_current_matrix(),
                               series_description="SYNTHETIC known rigid offset prior->current",
                               fixed_series=(cur["SeriesInstanceUID"], cur_uids),
                               moving_series=(pri["SeriesInstanceUID"], pri_uids))
    shutil.copyfile(protocols_dir() / "synthetic-demo.yaml", out_dir / "synthetic-demo.yaml")
    return _write_cases(out_dir, prior_structures)


def _write_cases(out_dir: Path, prior_structures: bool) -> Path:
    from .case import REGISTRATION_METHODS

    def case(prior: dict) -> dict:
        return {
            "patient": {"id": PATIENT["PatientID"], "name": PATIENT["PatientName"]},
            "reference": {"image": "ct_current", "structures": "rtstruct_current.dcm"},
            "grid": "dose",
            "protocol": "synthetic-demo.yaml",
            "courses": [
                dict({"name": "course1", "plan": "rtplan_course1.dcm", "interval_months": syn.INTERVAL_MONTHS},
                     **prior),
                {"name": "course2", "dose": "rtdose_course2.dcm", "plan": "rtplan_course2.dcm"},
            ],
        }
    header = "# SYNTHETIC NPC re-irradiation case in DICOM RT, generated by reirradiation-npc (not a patient)\n"
    variants = {
        "identity": case({"dose": "rtdose_course1_registered.dcm", "image": "ct_prior",
                          "registration": {"method": "identity"}}),
        "reg": case({"dose": "rtdose_course1.dcm", "image": "ct_prior",
                     "registration": {"method": "file", "transform": "reg_prior_to_current.dcm"}}),
        "rigid": case({"dose": "rtdose_course1.dcm", "image": "ct_prior", "registration": {"method": "rigid"}}),
    }
    for key, data in variants.items():
        (out_dir / f"case_{key}.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    best = "rigid" if "rigid" in REGISTRATION_METHODS else ("reg" if "file" in REGISTRATION_METHODS else "identity")
    path = out_dir / "case.yaml"
    path.write_text(header + f"# registration: same as case_{best}.yaml\n"
                    + yaml.safe_dump(variants[best], sort_keys=False), encoding="utf-8")
    log.info("synthetic DICOM case written to %s (case.yaml = case_%s.yaml)", out_dir, best)
    return path

"""RTSTRUCT ContourSequence read from its raw bytes (dicom_rt._contour_items_fast) against pydicom's own parsing.

The fast reader must give exactly what pydicom's path gives -- the same ROIs (numbers, names, colours, frame
UIDs), contours equal to the last bit, the same warnings, the same InputError -- and hand anything unusual back to
pydicom. "pydicom's path" is read_rtstruct_contours with the fast reader switched off (it returns None, as it does
for an unusual sequence). The expected points are also checked against the numbers written into the files.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ReirradiationNPCLib import dicom_export as dx
from ReirradiationNPCLib import dicom_rt as dr
from ReirradiationNPCLib.errors import InputError
from ReirradiationNPCLib.geometry import Grid, Volume

FRAME = "1.2.3.4.6"
IDENT = {"PatientName": "Test^Patient", "PatientID": "T-001", "StudyInstanceUID": "1.2.3.4.5",
         "FrameOfReferenceUID": FRAME, "StudyDate": "20250101"}
pytestmark = pytest.mark.filterwarnings("ignore:The value length")   # numerals of 17 digits written as DS

SYNTAX = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian, "big": ExplicitVRBigEndian}


def build(path, rois, *, syntax="explicit", undefined=False, image_refs=False):
    """An RTSTRUCT: ``rois`` = [(name, colour or None, [(type or None, ContourData text or None), ...])].
    ``undefined``: every sequence and item of undefined length; ``image_refs``: each contour item also holds a
    ContourImageSequence (a nested sequence the reader skips)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dr.RT_STRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.9"
    meta.TransferSyntaxUID = SYNTAX[syntax]
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "RTSTRUCT", IDENT["PatientID"], IDENT["PatientName"]
    rf = Dataset()
    rf.FrameOfReferenceUID = FRAME
    ds.ReferencedFrameOfReferenceSequence = Sequence([rf])
    ssroi, roic = [], []
    for n, (name, colour, contours) in enumerate(rois, start=1):
        r = Dataset()
        r.ROINumber, r.ROIName, r.ReferencedFrameOfReferenceUID = n, name, FRAME
        ssroi.append(r)
        rc = Dataset()
        rc.ReferencedROINumber = n
        if colour is not None:
            rc.ROIDisplayColor = list(colour)
        items = []
        for kind, data in contours:
            it = Dataset()
            if image_refs:
                im = Dataset()
                im.ReferencedSOPClassUID, im.ReferencedSOPInstanceUID = dr.CT_IMAGE_STORAGE, f"1.2.3.7.{n}"
                im.is_undefined_length_sequence_item = undefined
                it.ContourImageSequence = Sequence([im, im])
                it["ContourImageSequence"].is_undefined_length = undefined
            if kind is not None:
                it.ContourGeometricType = kind
            if data is not None:
                it.add_new(0x30060050, "DS", data)
                it.NumberOfContourPoints = max(1, len(data.split("\\")) // 3)
            it.is_undefined_length_sequence_item = undefined
            items.append(it)
        rc.ContourSequence = Sequence(items)
        rc["ContourSequence"].is_undefined_length = undefined
        rc.is_undefined_length_sequence_item = undefined
        roic.append(rc)
    ds.StructureSetROISequence = Sequence(ssroi)
    ds.ROIContourSequence = Sequence(roic)
    ds["ROIContourSequence"].is_undefined_length = undefined
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


def text(points) -> str:
    return "\\".join(str(v) for v in np.asarray(points, float).ravel())


SQUARE = [[-5.0, -5.0, 2.5], [5.0, -5.0, 2.5], [5.0, 5.0, 2.5], [-5.0, 5.0, 2.5]]
HOLE = [[-2.0, -2.0, 2.5], [2.0, -2.0, 2.5], [2.0, 2.0, 2.5], [-2.0, 2.0, 2.5]]
TRIANGLE = [[0.1, 0.2, 0.0], [10.25, 0.2, 0.0], [0.1, -7.125, 0.0]]
HAND_ROIS = [
    ("Ring", (255, 128, 0), [("CLOSED_PLANAR", text(SQUARE)), ("CLOSED_PLANAR", text(HOLE))]),
    ("Xor", None, [("CLOSEDPLANAR_XOR", text(SQUARE)), ("CLOSEDPLANAR_XOR", "0\\0\\2.5\\1\\0\\2.5\\0\\1\\2.5")]),
    ("Mixed", (0, 0, 255), [("OPEN_PLANAR", text(SQUARE)), ("CLOSED_PLANAR", "1.5\\2.5\\3.5"),
                            ("POINT", "1\\2\\3"), (None, text(SQUARE)), ("CLOSED_PLANAR", text(TRIANGLE)),
                            ("OPEN_NONPLANAR", None)]),
    ("Empty", (10, 20, 30), []),
]


def pydicom_path(path):
    """read_rtstruct_contours with the raw reader switched off: pydicom parses every ContourSequence."""
    fast = dr._contour_items_fast
    dr._contour_items_fast = lambda item: None
    try:
        return dr.read_rtstruct_contours(path)
    finally:
        dr._contour_items_fast = fast


def fast_path(path):
    """read_rtstruct_contours, and how many ContourSequences the raw reader read (not None) and handed back."""
    fast = dr._contour_items_fast
    used = []

    def counting(item):
        out = fast(item)
        used.append(out is not None)
        return out
    dr._contour_items_fast = counting
    try:
        return dr.read_rtstruct_contours(path), sum(used), used.count(False)
    finally:
        dr._contour_items_fast = fast


def assert_same(a, b):
    rois_a, ident_a, warn_a = a
    rois_b, ident_b, warn_b = b
    assert ident_a == ident_b and warn_a == warn_b
    assert [(r.number, r.name, r.color, r.frame_uid) for r in rois_a] == \
        [(r.number, r.name, r.color, r.frame_uid) for r in rois_b]
    for ra, rb in zip(rois_a, rois_b):
        assert len(ra.contours) == len(rb.contours)
        for ca, cb in zip(ra.contours, rb.contours):
            assert ca.dtype == cb.dtype == np.float64 and ca.shape == cb.shape and ca.tobytes() == cb.tobytes()


@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True])
@pytest.mark.parametrize("image_refs", [False, True])
def test_hand_built_rtstruct_read_fast_equals_pydicom(tmp_path, syntax, undefined, image_refs):
    """Explicit and implicit VR, sequences and items of defined and undefined length, a nested sequence to skip;
    contours of every type, one with a single point, one with no type, an ROI without colour, one without
    contours. Expected by hand: Ring's two squares, Xor's square and triangle, Mixed's triangle only (the 1-point
    contour and the open, point and untyped ones skipped with warnings), Empty skipped."""
    path = build(tmp_path / "rs.dcm", HAND_ROIS, syntax=syntax, undefined=undefined, image_refs=image_refs)
    got, used, handed_back = fast_path(path)
    assert_same(got, pydicom_path(path))
    # the outer ROIContourSequence of undefined length is parsed by pydicom when the file is read; its
    # ContourSequences are then already pydicom Sequences (the raw reader hands them back); so is an empty
    # sequence in implicit VR (Empty's)
    assert (used, handed_back) == ((0, 4) if undefined else (3, 1) if syntax == "implicit" else (4, 0))
    rois, ident, warns = got
    assert [r.name for r in rois] == ["Ring", "Xor", "Mixed"] and ident["FrameOfReferenceUID"] == FRAME
    assert rois[0].color == (1.0, 128 / 255, 0.0) and rois[1].color is None and rois[2].color == (0.0, 0.0, 1.0)
    np.testing.assert_array_equal(rois[0].contours[0], SQUARE)
    np.testing.assert_array_equal(rois[0].contours[1], HOLE)
    np.testing.assert_array_equal(rois[1].contours[1], [[0, 0, 2.5], [1, 0, 2.5], [0, 1, 2.5]])
    assert len(rois[2].contours) == 1
    np.testing.assert_array_equal(rois[2].contours[0], TRIANGLE)
    assert rois[2].contours[0][2, 1] == -7.125
    assert warns == [
        "rs.dcm: ROI 'Mixed': 1 OPEN_PLANAR contour(s) skipped (only closed planar contours define a volume)",
        "rs.dcm: ROI 'Mixed': 1 fewer than 3 points contour(s) skipped (only closed planar contours define a "
        "volume)",
        "rs.dcm: ROI 'Mixed': 1 POINT contour(s) skipped (only closed planar contours define a volume)",
        "rs.dcm: ROI 'Mixed': 1 (no type) contour(s) skipped (only closed planar contours define a volume)",
        "rs.dcm: ROI 'Mixed': 1 OPEN_NONPLANAR contour(s) skipped (only closed planar contours define a volume)",
        "rs.dcm: ROI 'Empty' has no closed planar contour; skipped"]


def test_raw_reader_reads_nested_undefined_lengths_itself(tmp_path):
    """A ContourSequence of defined length whose items (and their nested ContourImageSequence) have undefined
    length: read by the raw reader, not handed back."""
    path = build(tmp_path / "rs.dcm", HAND_ROIS[:1], syntax="implicit", undefined=True, image_refs=True)
    ds = pydicom.dcmread(path)
    ds["ROIContourSequence"].is_undefined_length = False
    ds.ROIContourSequence[0]["ContourSequence"].is_undefined_length = False
    ds.save_as(path)
    raw = pydicom.dcmread(path).ROIContourSequence[0].get_item(0x30060040)
    assert isinstance(raw.value, bytes) and raw.value.count(b"\xfe\xff\x0d\xe0") == 6   # 2 items + 2 x 2 nested
    got, used, handed_back = fast_path(path)
    assert (used, handed_back) == (1, 0)
    assert_same(got, pydicom_path(path))


def test_big_endian_is_left_to_pydicom(tmp_path):
    path = build(tmp_path / "rs.dcm", HAND_ROIS, syntax="big")
    got, used, handed_back = fast_path(path)
    assert (used, handed_back) == (0, 4)
    assert_same(got, pydicom_path(path))
    np.testing.assert_array_equal(got[0][2].contours[0], TRIANGLE)


def test_rtstruct_written_by_write_rtstruct(tmp_path):
    """The engine's own RTSTRUCT writer (contours along voxel edges, ContourImageSequence): every ContourSequence
    read raw, the same as pydicom's reading."""
    grid = Grid((40, 36, 12), (-20.0, -18.0, -15.0), (1.0, 1.0, 2.5))
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    ring = ((i - 20) ** 2 + (j - 18) ** 2 < 150) & ((i - 20) ** 2 + (j - 18) ** 2 >= 30) & (k > 2) & (k < 9)
    checker = ((i + j) % 2 == 0) & (i > 3) & (i < 9) & (j > 3) & (j < 9) & (k == 5)
    ct = Volume(np.zeros(grid.shape, np.int16), grid,
                meta={"dicom": dict(IDENT, SeriesInstanceUID="1.2.3.4.7",
                                    SOPInstanceUIDs=[f"1.2.3.4.8.{n}" for n in range(grid.size[2])])})
    path = tmp_path / "rs.dcm"
    dx.write_rtstruct([ring, checker], ["Ring", "Checker"], [(1, 0, 0), (0, 0.5, 0)], ct, path)
    got, used, handed_back = fast_path(path)
    assert (used, handed_back) == (2, 0)
    assert_same(got, pydicom_path(path))
    assert [r.name for r in got[0]] == ["Ring", "Checker"] and got[0][1].color == (0.0, 128 / 255, 0.0)
    assert sum(len(r.contours) for r in got[0]) > 10


# -------------------------------------------------------------------------- unusual bytes: pydicom decides

def patched(tmp_path, rois, old: bytes, new: bytes, **kw):
    """The file built from ``rois`` with the bytes ``old`` (once in it) replaced by ``new`` of the same length."""
    path = build(tmp_path / "rs.dcm", rois, **kw)
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    return path


def outcome(read, path):
    """("ok", what ``read`` returns) or (the exception's type, its message)."""
    try:
        return "ok", read(path)
    except Exception as exc:  # noqa: BLE001 - whatever pydicom's path does, the fast one must do too
        return type(exc).__name__, str(exc)


def same_outcome(path, fast_reads):
    fast, slow = outcome(fast_path, path), outcome(pydicom_path, path)
    assert fast[0] == slow[0]
    if slow[0] == "ok":
        assert fast[1][1:] == ((1, 0) if fast_reads else (0, 1))
        assert_same(fast[1][0], slow[1])
    else:
        assert fast[1] == slow[1]
    return slow


@pytest.mark.parametrize("token, fast_reads", [
    (b"1_0", True),           # float() takes it, as numpy's cast did: the same 10.0 both ways
    (b"nan", False), (b"inf", False), (b"1e99999", False),   # non-finite: pydicom's path refuses it
    (b"abcd", False), (b"0x1A", False), (b"", False),        # no number: pydicom's path refuses it
    (b"7\x00\x00\x00", True),  # NULs are dropped, as before
])
def test_odd_contour_numbers(tmp_path, token, fast_reads):
    rois = [("A", (1, 2, 3), [("CLOSED_PLANAR", text(SQUARE).replace("2.5", "98765432", 1))])]
    path = patched(tmp_path, rois, b"98765432", token.ljust(8))
    slow = same_outcome(path, fast_reads)
    if slow[0] != "ok":
        assert slow[0] == "InputError" and "ContourData" in slow[1]


@pytest.mark.parametrize("old, new", [
    (b"CLOSED_PLANAR", b"closed_planar"),        # lower case: pydicom's value upper-cased, as before
    (b"CLOSED_PLANAR", b"CLOSED\\PLANAR"),       # two values
    (b"CLOSED_PLANAR", b" CLOSED_PLANA"),        # a leading blank
    (b"\x42\x00CS", b"\x42\x00LO"),              # ContourGeometricType with another VR
    (b"\x50\x00DS", b"\x50\x00UN"),              # ContourData with another VR (2-byte length read as VR UN)
    (b"\x46\x00IS", b"\x50\x00IS"),              # NumberOfContourPoints re-tagged: ContourData twice
    (b"\x46\x00IS", b"\x46\x00xy"),              # not a VR: pydicom would switch to implicit VR
])
def test_unusual_items_are_left_to_pydicom(tmp_path, old, new):
    rois = [("A", (1, 2, 3), [("CLOSED_PLANAR", text(SQUARE))])]
    same_outcome(patched(tmp_path, rois, old, new), False)


def test_bad_rtstructs_give_the_same_input_error(tmp_path):
    """9 numbers per point triple miscounted (10 numbers), an ROI number absent from StructureSetROISequence."""
    p1 = build(tmp_path / "a.dcm", [("A", None, [("CLOSED_PLANAR", text(SQUARE) + "\\1")])])
    with pytest.raises(InputError, match=r"ContourData holds 13 numbers \(not x, y, z triples\)"):
        dr.read_rtstruct_contours(p1)
    assert outcome(pydicom_path, p1)[1] == outcome(dr.read_rtstruct_contours, p1)[1]
    p2 = patched(tmp_path, [("A", None, [("CLOSED_PLANAR", text(SQUARE))])], b"\x84\x00IS\x02\x001 ",
                 b"\x84\x00IS\x02\x007 ")
    with pytest.raises(InputError, match="refers to ROI number 7, absent"):
        dr.read_rtstruct_contours(p2)
    assert outcome(pydicom_path, p2)[1] == outcome(dr.read_rtstruct_contours, p2)[1]


# ------------------------------------------------------------------------------------------- properties

NUMERALS = st.one_of(
    st.integers(-10 ** 6, 10 ** 6).map(str),
    st.floats(-1e4, 1e4, allow_nan=False).map(lambda v: f"{v:.6f}"),
    st.floats(-1e4, 1e4, allow_nan=False).map(repr),
    st.floats(-1e4, 1e4, allow_nan=False).map(lambda v: f"{v:.17e}"),
    st.from_regex(r"\A ?[+-]?[0-9]{1,17}(\.[0-9]{0,9})?([eE][+-]?[0-9]{1,2})? ?\Z"),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_fast_equals_pydicom(tmp_path, data):
    """Random structure sets: 1-3 ROIs of 0-5 contours, each of a random type, 1-6 points written in many
    numeral forms (12 to 17 significant digits, exponents, signs, blanks), random encoding."""
    kinds = st.sampled_from(["CLOSED_PLANAR", "CLOSED_PLANAR", "CLOSEDPLANAR_XOR", "OPEN_PLANAR", "POINT", None])
    contour = st.tuples(kinds, st.lists(NUMERALS, min_size=3, max_size=18).map(
        lambda v: "\\".join(v[:len(v) // 3 * 3])))
    rois = [(f"R{n}", data.draw(st.one_of(st.none(), st.tuples(*[st.integers(0, 255)] * 3))),
             data.draw(st.lists(contour, max_size=5))) for n in range(data.draw(st.integers(1, 3)))]
    syntax = data.draw(st.sampled_from(["explicit", "implicit"]))
    image_refs = data.draw(st.booleans())
    path = build(tmp_path / "rs.dcm", rois, syntax=syntax, image_refs=image_refs)
    fast, slow = outcome(fast_path, path), outcome(pydicom_path, path)
    assert fast[0] == slow[0]
    if slow[0] == "ok":
        empty = sum(not contours for _, _, contours in rois) if syntax == "implicit" else 0
        assert fast[1][1:] == (len(rois) - empty, empty)     # empty in implicit VR: already a pydicom Sequence
        assert_same(fast[1][0], slow[1])
    else:
        assert fast[1] == slow[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(NUMERALS.map(str.encode), st.binary(max_size=6).filter(lambda b: b"\x00" not in b)),
                min_size=1, max_size=20))
def test_ds_numbers_is_numpys_cast_of_the_tokens(tokens):
    """_ds_numbers (Python's float() of each token) against the cast used before, numpy's bytes -> float64: the
    same bits, or both refuse the tokens."""
    try:
        before = np.array(tokens).astype(np.float64)
    except ValueError:
        with pytest.raises(ValueError):
            dr._ds_numbers(tokens)
        return
    after = dr._ds_numbers(tokens)
    assert after.dtype == np.float64 and after.tobytes() == before.tobytes()

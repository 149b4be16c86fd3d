"""ReirradiationNPC: cumulative EQD2 for re-irradiation of locally recurrent nasopharyngeal carcinoma (3D Slicer).

Slicer scripted module (module / widget / logic / test, as Slicer's template lays them out). The work is done by the
pure engine (``ReirradiationNPCLib``) and its MRML adapter (``ReirradiationNPCLib.mrml``); this file binds the UI to
the parameter node and calls the logic.
"""

import logging
from pathlib import Path
from typing import Annotated

import slicer
import vtk
from slicer import (vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode,
                    vtkMRMLTransformNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper, parameterPack
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent


#
# ReirradiationNPC
#

class ReirradiationNPC(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Reirradiation NPC")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiotherapy")]
        self.parent.dependencies = []  # SlicerRT is an extension dependency (dose volumes, DICOM RT, REG)
        self.parent.contributors = ["ReirradiationNPC developers"]
        self.parent.helpText = _(
            "Cumulative EQD2 for re-irradiation of locally recurrent nasopharyngeal carcinoma: maps prior-course "
            "dose onto the current CT, converts every course to EQD2 voxel by voxel (linear-quadratic model), sums "
            "them with an optional recovery credit, evaluates the protocol's limits and shows targets, violations "
            "and the cumulative DVH.<br>Protocol limits follow Ng WT et al., International Recommendations on "
            "Reirradiation by IMRT for Locally Recurrent Nasopharyngeal Carcinoma, Int J Radiat Oncol Biol Phys "
            "2021;110(3):682-695 (doi:10.1016/j.ijrobp.2021.01.041); limits not yet transcribed from its tables "
            "are marked unverified.<br>Requires 3D Slicer 5.8 or later (Python 3.9) and the SlicerRT extension."
            "<br><b>This tool supports a decision; the treating clinician decides.</b>")
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer and SlicerRT. Linear-quadratic and recovery conventions: see docs/science.md.")


#
# Parameter node
#

@parameterPack
class ReirradiationNPCCourse:
    """One course. ``fractions`` 0 means 'not entered' (the logic refuses it: nothing is defaulted)."""

    name: str
    dose: vtkMRMLScalarVolumeNode
    fractions: Annotated[int, WithinRange(0, 200)] = 0
    intervalMonths: Annotated[float, WithinRange(0.0, 600.0)] = 0.0
    ct: vtkMRMLScalarVolumeNode
    transform: vtkMRMLTransformNode


@parameterNodeWrapper
class ReirradiationNPCParameterNode:
    """Everything the analysis depends on, so a saved scene reproduces it. Courses oldest first; the last is the
    current course (its dose grid is the evaluation grid)."""

    courses: list[ReirradiationNPCCourse]
    selectedCourse: int = 0
    registrationMethod: Annotated[str, Choice(["existing transform", "rigid", "deformable"])] = "existing transform"
    protocol: str = "npc-reirradiation"
    customProtocolFile: Path
    segmentation: vtkMRMLSegmentationNode
    analysisName: str = "Reirradiation analysis"
    showMargins: bool = True
    showViolations: bool = True
    showHeadroom: bool = False
    showRemainingDose: bool = False
    # results (written by the logic)
    cumulativeEQD2: vtkMRMLScalarVolumeNode
    overlays: vtkMRMLSegmentationNode
    constraintsTable: vtkMRMLTableNode
    dvhChart: vtkMRMLPlotChartNode
    status: str = ""


#
# ReirradiationNPCWidget
#

class ReirradiationNPCWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    STATUS_COLORS = {"fail": "#f4b6b6", "warn": "#ffd89a", "pass": "#c9ecc9"}

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updating = False

    def setup(self) -> None:
        import qt
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ReirradiationNPC.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ReirradiationNPCLogic()
        self.ui.protocolComboBox.addItems(self.logic.shippedProtocols())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.addCourseButton.connect("clicked(bool)", self.onAddCourse)
        self.ui.removeCourseButton.connect("clicked(bool)", self.onRemoveCourse)
        self.ui.courseList.connect("currentRowChanged(int)", self.onSelectCourse)
        for w, signal in ((self.ui.courseNameLineEdit, "editingFinished()"),
                          (self.ui.courseDoseSelector, "currentNodeChanged(vtkMRMLNode*)"),
                          (self.ui.courseFractionsSpinBox, "valueChanged(int)"),
                          (self.ui.courseIntervalSpinBox, "valueChanged(double)"),
                          (self.ui.courseCTSelector, "currentNodeChanged(vtkMRMLNode*)"),
                          (self.ui.courseTransformSelector, "currentNodeChanged(vtkMRMLNode*)")):
            w.connect(signal, self.onCourseEdited)
        self.ui.protocolComboBox.connect("currentTextChanged(QString)", self.onProtocolSelected)
        self.ui.protocolTable.setEditTriggers(qt.QAbstractItemView.DoubleClicked | qt.QAbstractItemView.EditKeyPressed)
        self.ui.protocolTable.connect("itemChanged(QTableWidgetItem*)", self.onProtocolItemChanged)
        self.ui.registerButton.connect("clicked(bool)", self.onRegister)
        self.ui.computeButton.connect("clicked(bool)", self.onCompute)
        self.ui.jumpToWorstButton.connect("clicked(bool)", self.onJumpToWorst)
        self.ui.showDVHButton.connect("clicked(bool)", self.onShowDVH)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets with a SlicerParameterName property in the .ui are bound both ways here
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # ---------------------------------------------------------------------------------- parameter node -> GUI

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None or self._updating:
            return
        self._updating = True
        try:
            names = [c.name or _("(unnamed)") for c in p.courses]
            if names:
                names[-1] += "  " + _("(current)")
            if [self.ui.courseList.item(i).text() for i in range(self.ui.courseList.count)] != names:
                self.ui.courseList.clear()
                self.ui.courseList.addItems(names)
            index = min(p.selectedCourse, len(p.courses) - 1)
            self.ui.courseList.setCurrentRow(index)
            self.ui.courseEditor.enabled = index >= 0
            if index >= 0:
                c = p.courses[index]
                self.ui.courseNameLineEdit.text = c.name
                self.ui.courseDoseSelector.setCurrentNode(c.dose)
                self.ui.courseFractionsSpinBox.value = c.fractions
                self.ui.courseIntervalSpinBox.value = c.intervalMonths
                self.ui.courseIntervalSpinBox.enabled = index < len(p.courses) - 1
                self.ui.courseCTSelector.setCurrentNode(c.ct)
                self.ui.courseTransformSelector.setCurrentNode(c.transform)
            self.ui.protocolComboBox.setCurrentText(p.protocol)
            self.ui.computeButton.enabled = len(p.courses) > 0 and p.segmentation is not None
            self.ui.statusLabel.text = p.status
            self._fillProtocolTable()
            self._fillMappingTable()
            self._fillResultsTable()
            self.logic.applyDisplayToggles(p)
            self.ui.jumpToWorstButton.enabled = self.logic.worstViolationPosition(p) is not None
        finally:
            self._updating = False

    def _fillProtocolTable(self) -> None:
        import qt
        rows = [row for _keys, row in self.logic.protocolRows(self._parameterNode)]
        self._fillTable(self.ui.protocolTable, [_(h) for h in self.logic.PROTOCOL_COLUMNS], rows)
        editable = self.logic.EDITABLE_PROTOCOL_COLUMNS
        for r in range(self.ui.protocolTable.rowCount):
            for c in range(self.ui.protocolTable.columnCount):
                item = self.ui.protocolTable.item(r, c)
                if item is not None and c not in editable:
                    item.setFlags(item.flags() & ~qt.Qt.ItemIsEditable)

    def onProtocolItemChanged(self, item) -> None:
        if self._updating or self._parameterNode is None:
            return
        with slicer.util.tryWithErrorDisplay(_("The protocol value was not changed."), waitCursor=True):
            self.logic.editProtocolValue(self._parameterNode, item.row(), item.column(), item.text())
        self.updateGUIFromParameterNode()  # shows the saved value (or the unchanged one after an error)

    def _fillMappingTable(self) -> None:
        rows = self.logic.structureMapping(self._parameterNode)
        self._fillTable(self.ui.mappingTable, [_("Segment"), _("Organ")], [(s, o or _("UNMATCHED")) for s, o in rows],
                        colors=["#ffd89a" if o is None else None for _s, o in rows])

    def _fillResultsTable(self) -> None:
        node = self._parameterNode.constraintsTable
        if node is None:
            self._fillTable(self.ui.resultsTable, [], [])
            return
        t = node.GetTable()
        header = [t.GetColumnName(i) for i in range(t.GetNumberOfColumns())]
        rows = [[t.GetValue(r, c).ToString() for c in range(len(header))] for r in range(t.GetNumberOfRows())]
        colors = [self.STATUS_COLORS.get(row[0]) if row else None for row in rows]
        self._fillTable(self.ui.resultsTable, header, rows, colors)

    @staticmethod
    def _fillTable(table, header, rows, colors=None) -> None:
        import qt
        table.clear()
        table.setColumnCount(len(header))
        table.setHorizontalHeaderLabels(header)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                item = qt.QTableWidgetItem(str(value))
                if colors and colors[r]:
                    item.setBackground(qt.QColor(colors[r]))
                table.setItem(r, c, item)

    # ---------------------------------------------------------------------------------- GUI -> parameter node

    def onAddCourse(self) -> None:
        p = self._parameterNode
        course = ReirradiationNPCCourse()
        course.name = f"course{len(p.courses) + 1}"
        courses = list(p.courses)  # lists are written back whole (a new list is one parameter write)
        index = max(len(courses) - 1, 0)  # a new course is a prior course: the last one stays the current
        courses.insert(index, course)
        p.courses = courses
        p.selectedCourse = index

    def onRemoveCourse(self) -> None:
        p = self._parameterNode
        courses = list(p.courses)
        if 0 <= p.selectedCourse < len(courses):
            del courses[p.selectedCourse]
            p.courses = courses
            p.selectedCourse = max(0, min(p.selectedCourse, len(courses) - 1))

    def onProtocolSelected(self, name: str) -> None:
        if not self._updating and self._parameterNode is not None and name:
            self._parameterNode.protocol = name

    def onSelectCourse(self, row: int) -> None:
        if not self._updating and row >= 0:
            self._parameterNode.selectedCourse = row

    def onCourseEdited(self, *args) -> None:
        p = self._parameterNode
        if self._updating or p is None or not (0 <= p.selectedCourse < len(p.courses)):
            return
        courses = list(p.courses)
        c = courses[p.selectedCourse]
        c.name = self.ui.courseNameLineEdit.text.strip()
        c.dose = self.ui.courseDoseSelector.currentNode()
        c.fractions = self.ui.courseFractionsSpinBox.value
        c.intervalMonths = self.ui.courseIntervalSpinBox.value
        c.ct = self.ui.courseCTSelector.currentNode()
        c.transform = self.ui.courseTransformSelector.currentNode()
        p.courses = courses

    # ------------------------------------------------------------------------------------------------ actions

    def _progress(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    def onRegister(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            self.ui.registrationQALabel.text = self.logic.register(self._parameterNode, progress=self._progress)

    def onCompute(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The analysis could not be computed."), waitCursor=True):
            self.logic.process(self._parameterNode, progress=self._progress)

    def onJumpToWorst(self) -> None:
        self.logic.jumpToWorstViolation(self._parameterNode)

    def onShowDVH(self) -> None:
        self.logic.showDVH(self._parameterNode)


#
# ReirradiationNPCLogic
#

class ReirradiationNPCLogic(ScriptedLoadableModuleLogic):
    """Thin Slicer-side logic: reads the parameter node, calls the engine through the MRML adapter, writes result
    node references back. Never opens a dialog; reports progress through a callback; errors are exceptions
    (``ReirradiationNPCLib.errors.InputError`` for inputs the user can fix)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ensureDependencies()
        self._protocols = {}

    def getParameterNode(self):
        return ReirradiationNPCParameterNode(super().getParameterNode())

    @staticmethod
    def shippedProtocols() -> list:
        from ReirradiationNPCLib.protocol import shipped_protocols
        return shipped_protocols()

    def loadProtocol(self, p):
        """The selected protocol (custom file if set, else the shipped one), re-read when its file changes."""
        from ReirradiationNPCLib.protocol import load_protocol, resolve_protocol
        custom = str(p.customProtocolFile) if p.customProtocolFile else ""
        path = Path(custom) if custom not in ("", ".") else resolve_protocol(p.protocol)
        key = (str(path), path.stat().st_mtime if path.is_file() else None)
        if key not in self._protocols:
            self._protocols = {key: load_protocol(str(path))}
        return self._protocols[key]

    PROTOCOL_COLUMNS = ("Organ", "Role", "a/b (Gy)", "Metric", "Scope", "Limit", "Verified", "Source")
    EDITABLE_PROTOCOL_COLUMNS = {2: "alpha_beta", 5: "limit", 6: "verified", 7: "source"}

    def protocolRows(self, p) -> list:
        """((organ key, constraint index or None), display row) for every organ / constraint of the protocol."""
        try:
            protocol = self.loadProtocol(p)
        except Exception as exc:  # shown in the table; Compute reports the full error
            return [((None, None), (f"cannot load protocol: {exc}",))]
        rows = []
        for o in protocol.organs.values():
            for i, c in enumerate(o.constraints or [None]):
                rows.append(((o.key, i if c is not None else None),
                             (o.key, o.role, f"{o.alpha_beta:g}", c.metric.name if c else "-", c.scope if c else "-",
                              "-" if c is None or c.limit is None else f"{c.limit:g} {c.unit}",
                              "-" if c is None else ("yes" if c.verified else "NO"), c.source if c else "")))
        return rows

    def editProtocolValue(self, p, row: int, column: int, text: str) -> None:
        """Apply one edit of the protocol table: the first edit of a shipped protocol writes an edited copy in
        Slicer's default scene folder and selects it as the custom protocol file; the file is validated first."""
        from ReirradiationNPCLib.protocol import resolve_protocol
        from ReirradiationNPCLib.protocol_edit import edit_protocol
        field = self.EDITABLE_PROTOCOL_COLUMNS.get(column)
        (organ, index), _row = self.protocolRows(p)[row]
        if field is None or organ is None or (field != "alpha_beta" and index is None):
            raise ValueError(_("This cell cannot be edited."))
        custom = str(p.customProtocolFile) if p.customProtocolFile else ""
        if custom not in ("", "."):
            src = dst = Path(custom)
        else:
            src = resolve_protocol(p.protocol)
            dst = Path(slicer.app.defaultScenePath) / "ReirradiationNPC" / f"{src.stem}-edited.yaml"
        edit_protocol(src, dst, organ, field, text, index)
        p.customProtocolFile = dst

    def structureMapping(self, p) -> list:
        """(segment name, organ key or None) for every segment of the selected segmentation."""
        if p.segmentation is None:
            return []
        try:
            protocol = self.loadProtocol(p)
        except Exception:
            return []
        seg = p.segmentation.GetSegmentation()
        names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
        return [(n, protocol.match(n).key if protocol.match(n) else None) for n in names]

    def courseInputs(self, p) -> list:
        from ReirradiationNPCLib import mrml
        out = []
        for i, c in enumerate(p.courses):
            if c.transform is not None and c.dose is not None:
                c.dose.SetAndObserveTransformNodeID(c.transform.GetID())  # the prior dose is read through it
            current = i == len(p.courses) - 1
            out.append(mrml.CourseInput(c.name, c.dose, int(c.fractions), None if current else float(c.intervalMonths)))
        return out

    def register(self, p, progress=None) -> str:
        """Rigid registration of the selected prior course's CT to the current CT; returns the QA summary."""
        from ReirradiationNPCLib import mrml
        courses = list(p.courses)
        course, current = courses[p.selectedCourse], courses[-1]
        if course is current:
            raise ValueError(_("Select a prior course: the current course is the reference."))
        transform, summary = mrml.register_ct_nodes(course.name, p.registrationMethod, current.ct, course.ct,
                                                    progress)
        course.transform = transform
        p.courses = courses
        return summary

    def process(self, p, progress=None):
        """Run the analysis and create the result nodes (one subject-hierarchy folder)."""
        from ReirradiationNPCLib import mrml
        say = progress or (lambda m: None)
        protocol = self.loadProtocol(p)
        prep = mrml.prepare_from_nodes(self.courseInputs(p), p.segmentation, protocol,
                                       reference_image_node=p.courses[-1].ct if p.courses else None, progress=say)
        analysis, results, planning = mrml.run_engine(prep, say)
        out = mrml.create_output_nodes(prep, analysis, results, p.analysisName or "Reirradiation analysis",
                                       slicer.mrmlScene, say, planning=planning)
        p.cumulativeEQD2, p.overlays = out.cumulative, out.overlays
        p.constraintsTable, p.dvhChart = out.constraints_table, out.dvh_chart
        p.status = results.summary["verdict"]
        ct = p.courses[-1].ct
        slicer.util.setSliceViewerLayers(background=ct if ct is not None else "keep-current",
                                         foreground=out.cumulative, foregroundOpacity=0.5)
        return out

    @staticmethod
    def applyDisplayToggles(p) -> None:
        from ReirradiationNPCLib import mrml
        if p.overlays is not None and p.overlays.GetDisplayNode() is not None:
            seg, display = p.overlays.GetSegmentation(), p.overlays.GetDisplayNode()
            for i in range(seg.GetNumberOfSegments()):
                kind = vtk.reference("")
                seg.GetNthSegment(i).GetTag("ReirradiationNPC.Kind", kind)
                show = p.showMargins if str(kind) == "margin" else p.showViolations
                display.SetSegmentVisibility(seg.GetNthSegmentID(i), bool(show))
        for role, show in (("headroom", p.showHeadroom), ("remaining_dose", p.showRemainingDose)):
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if node.GetAttribute(mrml.ROLE_ATTRIBUTE) == role and node.GetDisplayNode():
                    node.GetDisplayNode().SetVisibility(bool(show))

    @staticmethod
    def worstViolationPosition(p):
        if p.overlays is None:
            return None
        text = p.overlays.GetAttribute("ReirradiationNPC.WorstViolationRAS")
        return [float(v) for v in text.split()] if text else None

    def jumpToWorstViolation(self, p) -> None:
        pos = self.worstViolationPosition(p)
        if pos is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*pos, True)

    @staticmethod
    def showDVH(p) -> None:
        if p.dvhChart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(p.dvhChart)


def ensureDependencies() -> None:
    """Install the engine's extra Python packages on first use (Resources/requirements.txt)."""
    try:
        import yaml  # noqa: F401
    except ImportError:
        logging.info("ReirradiationNPC: installing Python packages from Resources/requirements.txt")
        slicer.util.pip_install(["-r", str(MODULE_DIR / "Resources" / "requirements.txt")])


#
# ReirradiationNPCTest
#

class ReirradiationNPCTest(ScriptedLoadableModuleTest):
    """Runs the synthetic case inside Slicer: loads it as nodes, computes, and checks the verdict and nodes
    against the engine run from files (the same case, the same numbers)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SyntheticCase()

    def test_SyntheticCase(self):
        import tempfile

        from ReirradiationNPCLib import mrml
        from ReirradiationNPCLib.case import load_case
        from ReirradiationNPCLib.pipeline import prepare
        from ReirradiationNPCLib.synthetic import generate

        self.delayDisplay("Generating the synthetic case")
        case_path = generate(Path(tempfile.mkdtemp(prefix="ReirradiationNPCTest-")) / "case")
        prep_files = prepare(load_case(case_path))
        _, results_files, _ = mrml.run_engine(prep_files)
        case_dir = case_path.parent
        ct = slicer.util.loadVolume(str(case_dir / "ct.nrrd"))
        doses = [slicer.util.loadVolume(str(case_dir / f"dose_course{i}.nrrd")) for i in (1, 2)]
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Structures")
        seg.CreateDefaultDisplayNodes()
        for f in sorted((case_dir / "structures").glob("*.nrrd")):
            label = slicer.util.loadLabelVolume(str(f))
            label.SetName(f.name[:-len(".nrrd")])
            slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(label, seg)
            seg.GetSegmentation().GetNthSegment(seg.GetSegmentation().GetNumberOfSegments() - 1).SetName(label.GetName())
            slicer.mrmlScene.RemoveNode(label)

        logic = ReirradiationNPCLogic()
        p = logic.getParameterNode()
        p.protocol = "synthetic-demo"
        courses = []
        for name, node, n, months in (("course1", doses[0], 33, 30.0), ("course2", doses[1], 54, 0.0)):
            c = ReirradiationNPCCourse()
            c.name, c.dose, c.fractions, c.intervalMonths = name, node, n, months
            c.ct = ct if name == "course2" else None
            courses.append(c)
        p.courses = courses
        p.segmentation = seg
        self.delayDisplay("Computing")
        out = logic.process(p)
        self.assertEqual(out.cumulative.GetAttribute("DicomRtImport.DoseVolume"), "1")
        self.assertEqual(p.status, results_files.summary["verdict"])
        table = out.constraints_table.GetTable()
        self.assertEqual(table.GetNumberOfRows(), len(results_files.constraints))
        for r, c in enumerate(results_files.constraints):
            self.assertEqual(table.GetValue(r, 0).ToString(), c.status)
        self.delayDisplay("Test passed")

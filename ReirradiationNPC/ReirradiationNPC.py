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
    #: RBE statements as the case file's dose_type / rbe / radiation ("" / 0 = not stated; checked by the presenter)
    doseType: str = ""
    rbe: Annotated[float, WithinRange(0.0, 5.0)] = 0.0
    radiation: str = ""


@parameterNodeWrapper
class ReirradiationNPCParameterNode:
    """Everything the analysis depends on, so a saved scene reproduces it. Courses oldest first; the last is the
    current course (its dose grid is the evaluation grid). ``protocolSHA256``: the protocol file's hash at the last
    computation (its text is saved with the analysis, see ReirradiationNPCLib.mrml.protocol_text_node)."""

    courses: list[ReirradiationNPCCourse]
    selectedCourse: int = 0
    registrationMethod: Annotated[str, Choice(["rigid", "deformable", "existing transform"])] = "rigid"
    protocol: str = "npc-reirradiation"
    customProtocolFile: Path
    protocolSHA256: str = ""
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
# Dependencies
#

REQUIREMENTS = ["PyYAML>=6.0"]  # the same as Resources/requirements.txt


def missingDependencies() -> list:
    """Python packages the engine needs that Slicer does not ship, not importable here."""
    try:
        import yaml  # noqa: F401
    except ImportError:
        return list(REQUIREMENTS)
    return []


def ensureDependencies(ask: bool = True) -> str:
    """Install missing packages (PyYAML) on first use. ``ask``: confirm with the user first. Returns "" when
    everything is there, else a one-line reason (declined, or the install failed, e.g. offline): the caller shows
    it and keeps the panel open."""
    missing = missingDependencies()
    if not missing:
        return ""
    if ask and not slicer.util.confirmOkCancelDisplay(
            _("ReirradiationNPC needs the Python package(s) {packages}, not shipped with Slicer. Install them now "
              "from the Python Package Index (needs internet access)?").format(packages=", ".join(missing)),
            windowTitle=_("Install Python packages")):
        return _("Python package(s) {packages} not installed (declined). Restart the module to install them, or "
                 "install them offline: see docs/slicer.md.").format(packages=", ".join(missing))
    try:
        slicer.util.pip_install(missing)
    except Exception as exc:  # noqa: BLE001 - offline hospital PCs: the panel must stay usable to say so
        logging.warning("ReirradiationNPC: pip install %s failed: %s", missing, exc)
        return _("Could not install {packages} (no internet access?): {error}. Install them offline: see "
                 "docs/slicer.md, 'Offline installation'.").format(packages=", ".join(missing), error=exc)
    if missingDependencies():
        return _("{packages} installed but not importable: restart Slicer.").format(packages=", ".join(missing))
    return ""


#
# ReirradiationNPCWidget
#

class ReirradiationNPCWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node and to the Qt-free presenter (ReirradiationNPCLib.presenter): every
    decision (course order and names, transforms, checks, run state, display) is the presenter's."""

    STATUS_COLORS = {"fail": "#f4b6b6", "warn": "#ffd89a", "pass": "#c9ecc9", "condition_not_met": "#f4b6b6"}
    ACTION_BUTTONS = {"add": "addCourseButton", "remove": "removeCourseButton", "up": "moveCourseUpButton",
                      "down": "moveCourseDownButton", "register": "registerButton", "review": "reviewButton",
                      "compute": "computeButton", "export": "exportRtDoseButton", "report": "saveReportButton"}
    ADJUST_SPINBOXES = ("adjustTxSpinBox", "adjustTySpinBox", "adjustTzSpinBox", "adjustRxSpinBox",
                        "adjustRySpinBox", "adjustRzSpinBox")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.presenter = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updating = False
        self._dependencyProblem = ""
        self._displayKey = None
        self._doseChoices = [None]

    def setup(self) -> None:
        import qt
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ReirradiationNPC.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        # the panel opens even without PyYAML (offline PC): it then says why it cannot work
        self._dependencyProblem = ensureDependencies(ask=True)
        if self._dependencyProblem:
            self.ui.statusLabel.text = self._dependencyProblem
            for name in self.ACTION_BUTTONS.values():
                getattr(self.ui, name).enabled = False
            return
        self.logic = ReirradiationNPCLogic()
        self.ui.protocolComboBox.addItems(self.logic.shippedProtocols())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodesChanged)

        self.ui.addCourseButton.connect("clicked(bool)", self.onAddCourse)
        self.ui.removeCourseButton.connect("clicked(bool)", self.onRemoveCourse)
        self.ui.moveCourseUpButton.connect("clicked(bool)", lambda: self.onMoveCourse(-1))
        self.ui.moveCourseDownButton.connect("clicked(bool)", lambda: self.onMoveCourse(+1))
        self.ui.courseList.connect("currentRowChanged(int)", self.onSelectCourse)
        self.ui.courseNameLineEdit.connect("editingFinished()", self.onCourseRenamed)
        self.ui.courseDoseSelector.connect("currentIndexChanged(int)", self.onCourseEdited)
        for w, signal in ((self.ui.courseFractionsSpinBox, "valueChanged(int)"),
                          (self.ui.courseIntervalSpinBox, "valueChanged(double)"),
                          (self.ui.courseCTSelector, "currentNodeChanged(vtkMRMLNode*)"),
                          (self.ui.courseDoseTypeComboBox, "currentIndexChanged(int)"),
                          (self.ui.courseRBESpinBox, "valueChanged(double)"),
                          (self.ui.courseRadiationComboBox, "currentIndexChanged(int)")):
            w.connect(signal, self.onCourseEdited)
        self.ui.courseTransformSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTransformChanged)
        self.ui.protocolComboBox.connect("currentTextChanged(QString)", self.onProtocolSelected)
        self.ui.protocolTable.setEditTriggers(qt.QAbstractItemView.DoubleClicked | qt.QAbstractItemView.EditKeyPressed)
        self.ui.protocolTable.connect("itemChanged(QTableWidgetItem*)", self.onProtocolItemChanged)
        self.ui.registerButton.connect("clicked(bool)", self.onRegister)
        self.ui.reviewButton.connect("clicked(bool)", self.onReview)
        for name in self.ADJUST_SPINBOXES:
            getattr(self.ui, name).connect("valueChanged(double)", self.onAdjust)
        self.ui.adjustResetButton.connect("clicked(bool)", self.onAdjustReset)
        self.ui.computeButton.connect("clicked(bool)", self.onCompute)
        self.ui.jumpToWorstButton.connect("clicked(bool)", self.onJumpToWorst)
        self.ui.showDVHButton.connect("clicked(bool)", self.onShowDVH)
        self.ui.exportRtDoseButton.connect("clicked(bool)", self.onExportRtDose)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        if self.logic is not None:
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

    def onNodesChanged(self, caller=None, event=None) -> None:
        if self._parameterNode is not None and not self._updating and not self.logic.busy():
            self.updateGUIFromParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        self.presenter = self.logic.presenter(inputParameterNode) if inputParameterNode else None
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
            labels = self.presenter.course_labels()
            if [self.ui.courseList.item(i).text() for i in range(self.ui.courseList.count)] != labels:
                self.ui.courseList.clear()
                self.ui.courseList.addItems(labels)
            index = min(p.selectedCourse, len(p.courses) - 1)
            self.ui.courseList.setCurrentRow(index)
            self.ui.courseEditor.enabled = index >= 0
            self._fillDoseChoices(p.courses[index].dose if index >= 0 else None)
            if index >= 0:
                c = p.courses[index]
                self.ui.courseNameLineEdit.text = c.name
                self.ui.courseFractionsSpinBox.value = c.fractions
                self.ui.courseIntervalSpinBox.value = c.intervalMonths
                self.ui.courseIntervalSpinBox.enabled = not self.presenter.is_current(index)
                self.ui.courseCTSelector.setCurrentNode(c.ct)
                dose_types = ["", "PHYSICAL", "EFFECTIVE"]
                self.ui.courseDoseTypeComboBox.currentIndex = (dose_types.index(c.doseType)
                                                               if c.doseType in dose_types else 0)
                self.ui.courseRBESpinBox.value = c.rbe
                radiations = ["", "photon", "electron", "proton", "ion"]
                self.ui.courseRadiationComboBox.currentIndex = (radiations.index(c.radiation)
                                                                if c.radiation in radiations else 0)
                self.ui.courseTransformSelector.setCurrentNode(c.transform)
                self.ui.courseTransformSelector.enabled = not self.presenter.is_current(index)
                self._showAdjustment(c.transform)
            self.ui.protocolComboBox.setCurrentText(p.protocol)
            self.ui.statusLabel.text = p.status
            self._fillProtocolTable()
            self._fillMappingTable()
            self._fillResultsTable()
            key = (p.showMargins, p.showViolations, p.showHeadroom, p.showRemainingDose,
                   p.cumulativeEQD2.GetID() if p.cumulativeEQD2 is not None else None)
            if key != self._displayKey:  # only on a toggle or a new result: a review's fused layers stay
                self._displayKey = key
                self.presenter.apply_display()
            self._updateButtons()
        finally:
            self._updating = False

    def _updateButtons(self) -> None:
        states = self.presenter.button_states()
        for key, name in self.ACTION_BUTTONS.items():
            getattr(self.ui, name).enabled = bool(states.get(key))
        self.ui.jumpToWorstButton.enabled = (not states["cancel"]
                                             and self.logic.worstViolationPosition(self._parameterNode) is not None)
        self.ui.adjustGroupBox.enabled = states["review"]

    def _fillDoseChoices(self, selected) -> None:
        box = self.ui.courseDoseSelector
        choices = self.presenter.dose_choices()
        self._doseChoices = [None] + [c.node for c in choices]
        box.clear()
        box.addItem(_("(none)"))
        for c in choices:
            box.addItem(c.label)
        box.setCurrentIndex(self._doseChoices.index(selected) if selected in self._doseChoices else 0)

    def _showAdjustment(self, transform) -> None:
        from ReirradiationNPCLib import mrml_review
        values = mrml_review.adjustment_of(transform)
        for name, v in zip(self.ADJUST_SPINBOXES, values):
            getattr(self.ui, name).value = v

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

    # ---------------------------------------------------------------------------------- GUI -> presenter

    def onAddCourse(self) -> None:
        self.presenter.add_course()

    def onRemoveCourse(self) -> None:
        self.presenter.remove_course()

    def onMoveCourse(self, delta: int) -> None:
        self.presenter.move_course(self._parameterNode.selectedCourse, delta)

    def onProtocolSelected(self, name: str) -> None:
        if not self._updating and self._parameterNode is not None and name:
            self._parameterNode.protocol = name

    def onSelectCourse(self, row: int) -> None:
        if not self._updating and row >= 0:
            self._parameterNode.selectedCourse = row

    def onCourseRenamed(self) -> None:
        p = self._parameterNode
        if self._updating or p is None or not (0 <= p.selectedCourse < len(p.courses)):
            return
        with slicer.util.tryWithErrorDisplay(_("The course was not renamed.")):
            self.presenter.rename_course(p.selectedCourse, self.ui.courseNameLineEdit.text)
        self.updateGUIFromParameterNode()

    def onCourseEdited(self, *args) -> None:
        p = self._parameterNode
        if self._updating or p is None or not (0 <= p.selectedCourse < len(p.courses)):
            return
        index = self.ui.courseDoseSelector.currentIndex
        dose = self._doseChoices[index] if 0 <= index < len(self._doseChoices) else None
        self.presenter.set_course_fields(p.selectedCourse, dose=dose, fractions=self.ui.courseFractionsSpinBox.value,
                                         intervalMonths=self.ui.courseIntervalSpinBox.value,
                                         ct=self.ui.courseCTSelector.currentNode())
        # RBE statements (first item "(not stated)" = ""); a malformed one is shown, not stored
        dose_type = ["", "PHYSICAL", "EFFECTIVE"][max(0, self.ui.courseDoseTypeComboBox.currentIndex)]
        radiation = ["", "photon", "electron", "proton", "ion"][max(0, self.ui.courseRadiationComboBox.currentIndex)]
        rbe = self.ui.courseRBESpinBox.value
        fields = dict(doseType=dose_type, radiation=radiation)
        if rbe == 0.0 or rbe >= 1.0:  # 0 = not stated; between 0 and 1 the user is still stepping up: not stored
            fields["rbe"] = rbe
        with slicer.util.tryWithErrorDisplay(_("The course's dose type, RBE or radiation was not accepted.")):
            self.presenter.set_course_fields(p.selectedCourse, **fields)

    def onTransformChanged(self, node) -> None:
        p = self._parameterNode
        if self._updating or p is None or not (0 <= p.selectedCourse < len(p.courses)):
            return
        self.presenter.set_transform(p.selectedCourse, node)  # None clears it

    # ------------------------------------------------------------------------------------------------ actions

    def _runLong(self, title: str, work):
        """Run ``work(progress)`` with a progress dialog (Cancel asks the presenter to stop at its next step),
        every action button disabled; errors are shown, never raised into Qt."""
        from ReirradiationNPCLib.presenter import Cancelled
        dialog = slicer.util.createProgressDialog(labelText=title, windowTitle=_("ReirradiationNPC"), maximum=0)
        dialog.connect("canceled()", self.presenter.run.cancel)
        for name in self.ACTION_BUTTONS.values():
            getattr(self.ui, name).enabled = False

        def progress(message):
            dialog.labelText = message
            self.ui.statusLabel.text = message
            slicer.app.processEvents()  # the dialog's Cancel; the action buttons stay disabled meanwhile

        try:
            with slicer.util.tryWithErrorDisplay(_("{title} failed.").format(title=title), waitCursor=True):
                try:
                    return work(progress)
                except Cancelled:
                    self.ui.statusLabel.text = _("Cancelled: nothing was changed.")
                    return None
        finally:
            dialog.close()
            self.updateGUIFromParameterNode()

    def onRegister(self) -> None:
        summary = self._runLong(_("Registration"), lambda progress: self.presenter.register(progress=progress))
        if summary:
            self.ui.registrationQALabel.text = summary

    def onReview(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The registration cannot be reviewed.")):
            self.presenter.review()

    def onAdjust(self, *args) -> None:
        p = self._parameterNode
        if self._updating or p is None or not (0 <= p.selectedCourse < len(p.courses) - 1):
            return
        values = [getattr(self.ui, name).value for name in self.ADJUST_SPINBOXES]
        with slicer.util.tryWithErrorDisplay(_("The transform was not adjusted.")):
            self.presenter.adjust(p.selectedCourse, *values)

    def onAdjustReset(self) -> None:
        for name in self.ADJUST_SPINBOXES:
            getattr(self.ui, name).value = 0.0
        self.onAdjust()

    def onCompute(self) -> None:
        def confirm(messages):
            return slicer.util.confirmOkCancelDisplay(
                _("These doses cannot be checked (no DICOM RTDOSE header):") + "\n\n- " + "\n- ".join(messages)
                + "\n\n" + _("Confirm that each is the course's TOTAL PHYSICAL dose in Gy (not per fraction, not "
                             "per beam, not EQD2). The results will say they were not checked."),
                windowTitle=_("Unchecked doses"))
        self._runLong(_("Computing the analysis"), lambda progress: self.logic.process(
            self._parameterNode, self.presenter, confirm=confirm, progress=progress))

    def onJumpToWorst(self) -> None:
        self.logic.jumpToWorstViolation(self._parameterNode)

    def onShowDVH(self) -> None:
        self.logic.showDVH(self._parameterNode)

    def onExportRtDose(self) -> None:
        import qt
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the RTDOSE file"))
        if folder:
            path = self._runLong(_("Exporting the cumulative EQD2 as RTDOSE"),
                                 lambda progress: self.logic.exportRtDose(self._parameterNode, self.presenter,
                                                                          Path(folder)))
            if path:
                self.ui.statusLabel.text = _("RTDOSE written: {path}").format(path=path)

    def onSaveReport(self) -> None:
        import qt
        folder = qt.QFileDialog.getExistingDirectory(None, _("Empty folder for report.html"))
        if folder:
            path = self._runLong(_("Writing the report"), lambda progress: self.presenter.save_report(Path(folder)))
            if path:
                self.ui.statusLabel.text = _("Report written: {path}").format(path=path)


#
# ReirradiationNPCLogic
#

class ReirradiationNPCLogic(ScriptedLoadableModuleLogic):
    """Thin Slicer-side logic: the parameter node, protocol loading and editing, and the few Slicer-only calls
    (DICOM database, layouts). The panel's decisions are in ReirradiationNPCLib.presenter (tested headless). Never
    opens a dialog; errors are exceptions (``ReirradiationNPCLib.errors.InputError`` for inputs the user can fix)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._protocols = {}
        self._presenters = {}

    def getParameterNode(self):
        return ReirradiationNPCParameterNode(super().getParameterNode())

    def presenter(self, p):
        """The presenter of this parameter node (one per node: it keeps the run state and the last results)."""
        from ReirradiationNPCLib.presenter import Presenter
        key = p.parameterNode.GetID() if hasattr(p, "parameterNode") else id(p)
        if key not in self._presenters:
            self._presenters[key] = Presenter(p, course_factory=ReirradiationNPCCourse, scene=slicer.mrmlScene,
                                              dicom_database=getattr(slicer, "dicomDatabase", None))
        self._presenters[key].p = p
        return self._presenters[key]

    def busy(self) -> bool:
        return any(pr.run.running for pr in self._presenters.values())

    @staticmethod
    def shippedProtocols() -> list:
        from ReirradiationNPCLib.protocol import shipped_protocols
        return shipped_protocols()

    def protocolPath(self, p) -> Path:
        """The protocol file to use: the custom file if set, else the shipped one. When the scene's analysis saved
        a copy whose hash differs from the file now there (edited since, or gone), the saved copy is written to a
        new file and used, so that a saved scene reproduces its analysis."""
        from ReirradiationNPCLib.presenter import restore_protocol
        from ReirradiationNPCLib.protocol import resolve_protocol
        custom = str(p.customProtocolFile) if p.customProtocolFile else ""
        path = Path(custom) if custom not in ("", ".") else resolve_protocol(p.protocol)
        if p.protocolSHA256:
            restored = restore_protocol(path, p.protocolSHA256, slicer.mrmlScene,
                                        Path(slicer.app.defaultScenePath) / "ReirradiationNPC")
            if restored != path:
                p.customProtocolFile = restored
                path = restored
        return path

    def loadProtocol(self, p):
        """The selected protocol, re-read when its file changes."""
        from ReirradiationNPCLib.protocol import load_protocol
        path = self.protocolPath(p)
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
        """Apply one edit of the protocol table. Every edit writes a NEW file (``<protocol>-edited.yaml``, then
        ``-edited-2``, ...) in Slicer's default scene folder and selects it: a file another saved scene uses is never
        overwritten, and the shipped protocols are never changed. The file is validated before it is written."""
        from ReirradiationNPCLib.presenter import next_free_path
        from ReirradiationNPCLib.protocol_edit import edit_protocol
        field = self.EDITABLE_PROTOCOL_COLUMNS.get(column)
        (organ, index), _row = self.protocolRows(p)[row]
        if field is None or organ is None or (field != "alpha_beta" and index is None):
            raise ValueError(_("This cell cannot be edited."))
        src = self.protocolPath(p)
        base = src.stem.split("-edited")[0]
        dst = next_free_path(Path(slicer.app.defaultScenePath) / "ReirradiationNPC" / f"{base}-edited.yaml")
        dst.parent.mkdir(parents=True, exist_ok=True)
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

    def process(self, p, presenter=None, confirm=None, progress=None):
        """Run the analysis through the presenter and show it (CT behind, the cumulative EQD2 as a colour wash)."""
        import hashlib
        presenter = presenter or self.presenter(p)
        protocol = self.loadProtocol(p)
        out = presenter.compute(protocol, confirm=confirm, progress=progress)
        p.protocolSHA256 = hashlib.sha256(Path(protocol.path).read_bytes()).hexdigest()
        ct = p.courses[-1].ct
        slicer.util.setSliceViewerLayers(background=ct if ct is not None else "keep-current",
                                         foreground=out.cumulative, foregroundOpacity=0.5)
        presenter.apply_display()
        return out

    def exportRtDose(self, p, presenter, folder: Path) -> Path:
        """The cumulative EQD2 as an RTDOSE (DoseType EFFECTIVE) in the current CT's patient and study, imported
        into the DICOM database so it appears under that study. Written by this module's DICOM writer, not
        SlicerRT's exporter: SlicerRT's writer labels every dose DoseType PHYSICAL, and an EQD2 read back as a
        physical dose would be converted to EQD2 again."""
        from ReirradiationNPCLib.mrml_provenance import reference_identity
        ct = p.courses[-1].ct if p.courses else None
        identity = reference_identity(ct, getattr(slicer, "dicomDatabase", None), slicer.mrmlScene)
        path = presenter.export_rtdose_file(folder, identity)
        db = getattr(slicer, "dicomDatabase", None)
        if db is not None:
            from DICOMLib import DICOMUtils
            DICOMUtils.importDicom(str(path.parent), db)
        return path

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


#
# ReirradiationNPCTest
#

class ReirradiationNPCTest(ScriptedLoadableModuleTest):
    """Runs the synthetic case inside Slicer: loads it as nodes, computes, and checks the verdict and nodes
    against the engine run from files (the same case, the same numbers). Installs PyYAML if missing (no
    question: a test run) and is skipped, saying why, when it cannot."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        problem = ensureDependencies(ask=False)
        if problem:
            import unittest
            raise unittest.SkipTest(problem)
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
        presenter = logic.presenter(p)
        for node, n, months in ((doses[0], 33, 30.0), (doses[1], 54, 0.0)):
            i = presenter.add_course()
            presenter.set_course_fields(i, dose=node, fractions=n, intervalMonths=months)
        presenter.set_course_fields(1, ct=ct)
        self.assertEqual([c.name for c in p.courses], ["course1", "course2"])
        p.segmentation = seg
        self.delayDisplay("Computing")
        out = logic.process(p, presenter, confirm=lambda messages: True)  # NRRD doses: no DICOM header
        self.assertEqual(out.cumulative.GetAttribute("DicomRtImport.DoseVolume"), "1")
        self.assertIn(results_files.summary["verdict"], p.status)
        table = out.constraints_table.GetTable()
        self.assertEqual(table.GetNumberOfRows(), len(results_files.constraints))
        for r, c in enumerate(results_files.constraints):
            self.assertEqual(table.GetValue(r, 0).ToString(), c.status)
        self.delayDisplay("Test passed")

"""The side panels of ``reirradiation-npc review`` on the trame page (the plain-data part is :mod:`.review_panels`):

- **DVH of the selected organ**: when a constraint row is clicked, the cumulative EQD2 DVH of its organ, computed
  from the run's check map of the row's basis inside the organ's segment of the scene, with each of the organ's
  cumulative limits drawn (red when failed) and the basis stated (an inline SVG).
- **Registration check**: a course selector and a blend slider. Choosing a prior course puts its CT, as the run
  mapped it onto the reference CT through its registration (``prior_ct_<course>_registered.nrrd``, linear
  interpolation, the transform of ``transform_<course>.tfm``), in the foreground of every slice view over the current
  CT at the chosen opacity; the course's registration QA figures from results.json are listed beside it. Choosing
  "off" puts back the foreground each view had (the dose wash).

Everything is read from the results folder; nothing is written into it.

The review app builds them (``ReviewPanels(app)``, ``build_ui()`` where they go on the page) and calls
:meth:`ReviewPanels.show_dvh` when a row is selected.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .review_panels import (curve_source, dvh_svg, limit_marks, organ_curve, registration_summary,
                            sampling_factors)

log = logging.getLogger(__name__)

REG_OFF = "off"
REG_BLEND = 0.5


class ReviewPanels:
    """DVH and registration panels of a :class:`.mrml_web_review.ReviewApp` (``app``: its run, scene, views)."""

    def __init__(self, app):
        self.app = app
        self.results = app.run.results
        self.folder = Path(app.run.folder)
        self.registrations = {r.course: r for r in registration_summary(self.results)}
        self._doses = {}
        self._structures = None
        self._prior_nodes = {}
        self._saved_foreground = None
        state = app.server.state
        state.dvh_svg = ""
        state.dvh_basis = "Click a constraint row to see that organ's cumulative EQD2 DVH with its limits."
        state.dvh_notes = []
        state.reg_items = [{"title": "off (dose wash)", "value": REG_OFF}] + [
            {"title": f"{r.course} ({r.method})", "value": r.course} for r in self.registrations.values()]
        state.reg_course = REG_OFF
        state.reg_blend = REG_BLEND
        state.reg_figures = []
        state.reg_info = ("Prior courses: " + ", ".join(self.registrations) if self.registrations
                          else "No prior-course registration in results.json.")
        state.change("reg_course", "reg_blend")(self._on_registration)

    # --------------------------------------------------------------------------------------------------- DVH
    def _dose(self, name: str):
        if name not in self._doses:
            from .io import read_dose
            self._doses[name] = read_dose(self.folder / name, what=name)
        return self._doses[name]

    def _structure(self, name: str):
        if self._structures is None:
            self._structures = {}
            if self.app.structures is not None:
                from .mrml import structures_from_segmentation
                self._structures = {s.name: s for s in structures_from_segmentation(self.app.structures)}
        return self._structures.get(name)

    def show_dvh(self, index: int) -> None:
        """The DVH panel for constraint row ``index`` (results.json order)."""
        state = self.app.server.state
        rows = self.results.get("constraints") or []
        try:
            row = rows[int(index)]
        except (TypeError, ValueError, IndexError):
            return
        name = str(row.get("structure") or row.get("organ") or "?")
        basis = row.get("basis") if (row.get("scope") or "cumulative") == "cumulative" else None
        src = curve_source(self.results, name, basis)
        marks, skipped = limit_marks(self.results, name)
        other = [m for m in marks if m.basis and src.basis in ("credited", "undiscounted") and m.basis != src.basis]
        notes = list(skipped) + [f"{m.label}: judged on the {m.basis} sum (the curve is the {src.basis} one)"
                                 for m in other]
        curve, why = None, ""
        s = self._structure(name)
        if s is None:
            why = "no segment of this organ in the scene (run with --scene)"
        elif not (self.folder / src.file).is_file():
            why = f"{src.file} is not in the results folder"
        else:
            try:
                d = self._dose(src.file)
                curve = organ_curve(s.mask, s.grid, d.array, d.grid, sampling_factors(self.results, name))
            except Exception as exc:  # noqa: BLE001 - a panel must not take the page down
                log.warning("DVH of %s: %s", name, exc)
                why = f"cannot read {src.file}: {exc}"
        state.dvh_svg = dvh_svg(curve, marks, f"{name}: cumulative EQD2 DVH", note=why)
        state.dvh_basis = src.text + (f" — {why}" if why else "")
        state.dvh_notes = notes

    # ------------------------------------------------------------------------------------------ registration
    def _prior_node(self, course: str):
        if course in self._prior_nodes:
            return self._prior_nodes[course]
        node = None
        reg = self.registrations.get(course)
        path = self.folder / reg.registered_ct if reg is not None and reg.registered_ct else None
        if path is not None and path.is_file():
            nodes = self.app.slicer_app.io_manager.load_volumes([str(path)])
            node = nodes[0] if nodes else None
            if node is not None:
                node.SetName(f"CT {course} registered (review)")
                if node.GetDisplayNode() is None:
                    node.CreateDefaultDisplayNodes()
                disp = node.GetDisplayNode()
                disp.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
                disp.AutoWindowLevelOff()
                ct = self.app.ct.GetDisplayNode() if self.app.ct is not None else None
                if ct is not None:
                    disp.SetWindowLevel(ct.GetWindow(), ct.GetLevel())
                else:
                    disp.SetWindowLevel(400.0, 40.0)
        self._prior_nodes[course] = node
        return node

    def _on_registration(self, reg_course=None, reg_blend=None, **_):
        state = self.app.server.state
        views = self.app.slicer_app.view_manager.get_slice_views()
        course = reg_course or REG_OFF
        if course == REG_OFF:
            if self._saved_foreground is not None:
                for view, (fg, opacity) in zip(views, self._saved_foreground):
                    view.set_foreground_volume_id(fg)
                    view.set_foreground_opacity(opacity)
                    view.schedule_render()
                self._saved_foreground = None
                self._restore_wash()
            state.reg_figures = []
            state.reg_info = ("Prior courses: " + ", ".join(self.registrations) if self.registrations
                              else "No prior-course registration in results.json.")
            return
        reg = self.registrations.get(course)
        if reg is None:
            return
        state.reg_figures = [{"label": k, "text": v} for k, v in reg.figures]
        node = self._prior_node(course)
        if node is None:
            state.reg_info = (f"{course}: no registered prior CT in the results folder "
                              f"({'registration ' + reg.method}; nothing to blend)")
            return
        if self._saved_foreground is None:
            self._saved_foreground = [(v.get_foreground_volume_id(), v.get_foreground_opacity()) for v in views]
        blend = float(REG_BLEND if reg_blend is None else reg_blend)
        for view in views:
            view.set_foreground_volume_id(node.GetID())
            view.set_foreground_opacity(blend)
            view.schedule_render()
        state.reg_info = (f"{course}: prior CT through its {reg.method} registration ({reg.registered_ct}) over the "
                          f"current CT, opacity {blend:.2f}")

    def wash_held(self, wash_id) -> bool:
        """While the registration check shows a prior CT in the slice views' foreground: make ``wash_id`` (a volume
        node ID, or None for no foreground) what "off" puts back in every view (each view keeps its own opacity), and
        say True; the views are left as they are. When the check is off: False, nothing changed (the caller shows
        the wash itself)."""
        if self._saved_foreground is None:
            return False
        self._saved_foreground = [(wash_id, opacity) for _, opacity in self._saved_foreground]
        return True

    def _restore_wash(self) -> None:
        """When the app has a wash selector (``set_wash``), show the wash chosen now (it may have changed while the
        prior CT was shown), at the wash opacity chosen now."""
        set_wash = getattr(self.app, "set_wash", None)
        state = self.app.server.state
        key, opacity = state["wash_key"], state["wash_opacity"]  # None when the page has no such control
        if callable(set_wash) and key is not None:
            set_wash(key)
            if opacity is not None:
                for view in self.app.slicer_app.view_manager.get_slice_views():
                    view.set_foreground_opacity(float(opacity))
                    view.schedule_render()

    # ---------------------------------------------------------------------------------------------------- UI
    def build_ui(self) -> None:
        """The two panels, in the current trame layout context (above the constraint table)."""
        from trame.widgets import html

        with html.Div(id="dvh-panel", style="margin-top: 8px;"):
            html.Div("{{ dvh_basis }}", id="dvh-basis", style="margin: 2px 0; font-style: italic;")
            html.Div(id="dvh", v_html="dvh_svg")
            with html.Ul(id="dvh-notes", style="margin: 2px 0 0 16px;"):
                html.Li("{{ n }}", v_for="n in dvh_notes", key="n")
        with html.Div(id="registration-panel", style="margin-top: 8px; border-top: 1px solid #888; "
                                                     "padding-top: 4px;"):
            with html.Div(style="display: flex; gap: 12px; align-items: center;"):
                html.Label("Registration check")
                with html.Select(id="reg-course", v_model=("reg_course", REG_OFF),
                                 style="border: 1px solid #888; border-radius: 3px; padding: 1px 4px;"):
                    html.Option("{{ it.title }}", v_for="it in reg_items", key="it.value",
                                value=("it.value",))
                html.Label("prior CT opacity {{ reg_blend }}")
                html.Input(id="reg-blend", type="range", min=0, max=1, step=0.05,
                           v_model=("reg_blend", REG_BLEND))
            html.Div("{{ reg_info }}", id="reg-info", style="margin: 2px 0;")
            with html.Table(id="reg-figures", style="border-collapse: collapse; margin-bottom: 6px;"):
                with html.Tr(v_for="f in reg_figures", key="f.label + f.text", classes="reg-figure"):
                    html.Td("{{ f.label }}", style="padding: 1px 6px 1px 0; color: #555;")
                    html.Td("{{ f.text }}", style="padding: 1px 4px;")

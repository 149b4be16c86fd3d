"""The Slicer module file (ReirradiationNPC.py) imported on slicer-core with stand-ins for the Qt-only parts
(ScriptedLoadableModule, parameterNodeWrapper, i18n, dialogs): its dependency handling (confirmation, declined,
offline: the panel must still open and say why) and its logic's protocol editing (every edit a new file)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from ReirradiationNPCLib.mrml_headless import unavailable_reason

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"slicer-core not available: {_REASON}")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def module(monkeypatch, tmp_path):
    import slicer
    from ReirradiationNPCLib import mrml_headless
    app = mrml_headless.start()

    class _Base:
        def __init__(self, *args, **kwargs):
            pass

        def getParameterNode(self):
            return None

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (_Base,), {}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = pnw.parameterPack = lambda cls: cls
    pnw.Choice = pnw.WithinRange = lambda *a, **k: None
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, mod in (("slicer.ScriptedLoadableModule", slm), ("slicer.parameterNodeWrapper", pnw),
                      ("slicer.i18n", i18n)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(defaultScenePath=str(tmp_path / "scenes")),
                        raising=False)
    spec = importlib.util.spec_from_file_location("ReirradiationNPC_under_test",
                                                  ROOT / "ReirradiationNPC" / "ReirradiationNPC.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._app = app
    return mod


def test_dependencies_declined_or_offline_leave_a_message_not_a_broken_panel(module, monkeypatch):
    import slicer
    monkeypatch.setattr(module, "missingDependencies", lambda: ["PyYAML>=6.0"])
    asked, installed = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda req: installed.append(req))
    msg = module.ensureDependencies(ask=True)
    assert asked and "PyYAML" in asked[0] and installed == [] and "declined" in msg

    def offline(req):
        raise RuntimeError("Could not find a version that satisfies the requirement PyYAML")
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: True)
    monkeypatch.setattr(slicer.util, "pip_install", offline)
    msg = module.ensureDependencies(ask=True)
    assert "Could not install" in msg and "Offline installation" in msg
    # the self-test's path: no question asked
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: pytest.fail("asked"))
    assert "Could not install" in module.ensureDependencies(ask=False)
    monkeypatch.setattr(module, "missingDependencies", lambda: [])
    assert module.ensureDependencies(ask=True) == ""


def test_requirements_file_and_module_agree():
    text = (ROOT / "ReirradiationNPC" / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    source = (ROOT / "ReirradiationNPC" / "ReirradiationNPC.py").read_text(encoding="utf-8")
    assert lines == ["PyYAML>=6.0"] and 'REQUIREMENTS = ["PyYAML>=6.0"]' in source


def test_every_protocol_edit_writes_a_new_file_and_the_shipped_one_is_unchanged(module, tmp_path):
    from ReirradiationNPCLib.protocol import load_protocol, resolve_protocol
    shipped = resolve_protocol("synthetic-demo")
    before = shipped.read_bytes()
    logic = module.ReirradiationNPCLogic()
    p = types.SimpleNamespace(protocol="synthetic-demo", customProtocolFile=None, protocolSHA256="")
    rows = logic.protocolRows(p)
    row = next(i for i, ((organ, idx), _r) in enumerate(rows) if organ == "brainstem")
    logic.editProtocolValue(p, row, 2, "2.5")  # alpha/beta column
    first = Path(p.customProtocolFile)
    assert first.name == "synthetic-demo-edited.yaml"
    assert load_protocol(str(first)).organs["brainstem"].alpha_beta == 2.5
    logic.editProtocolValue(p, row, 2, "3")
    second = Path(p.customProtocolFile)
    assert second.name == "synthetic-demo-edited-2.yaml" and second != first
    assert load_protocol(str(first)).organs["brainstem"].alpha_beta == 2.5  # the first edit's file is kept
    assert load_protocol(str(second)).organs["brainstem"].alpha_beta == 3.0
    assert shipped.read_bytes() == before

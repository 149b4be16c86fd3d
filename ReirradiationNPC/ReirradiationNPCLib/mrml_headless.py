"""A Slicer application without Qt, from the PyPI package ``slicer-core``: a MRML scene with the application,
colour, volumes, segmentations, transforms and subject-hierarchy logics.

Inside 3D Slicer this module is not used (Slicer provides ``slicer.mrmlScene`` and ``slicer.modules``). Outside it,
:func:`start` builds the same plumbing so that :mod:`.mrml` and ``slicer.util`` work on a real scene, for tests and
for ``reirradiation-npc run --scene``.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import tempfile
import types
from dataclasses import dataclass

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'reirradiation-npc[slicer]' (the PyPI package slicer-core 5.11.0.x)"


def unavailable_reason(import_check: bool = True) -> str | None:
    """None when slicer-core can be imported here, otherwise a one-line reason. ``import_check=False``: only
    whether the package is installed (no import, which takes 1-2 s; the demo imports it later in the process that
    builds the scene and reports a failed import there)."""
    try:
        if importlib.util.find_spec("slicer") is None:
            return f"the Python package slicer-core is not installed ({INSTALL_HINT})"
        if not import_check:
            return None
        import slicer
    except ImportError as exc:
        return f"the Python package slicer-core cannot be imported ({exc}; {INSTALL_HINT})"
    except Exception as exc:  # noqa: BLE001 - a broken binary install must become a readable reason
        return f"slicer-core cannot be imported: {type(exc).__name__}: {exc}"
    if not hasattr(slicer, "vtkMRMLScene"):
        return "the 'slicer' package found here has no MRML classes (not slicer-core?)"
    return None


#: the name of a process's cache folder in the temporary folder: this prefix, its pid, "-", random characters
CACHE_PREFIX = "reirradiation-npc-cache-"

_CACHE_DIR: list = []   # [(pid, folder)] of this process (a forked child finds its parent's here: not its own)


def _cache_dir() -> str:
    """An empty folder of our own for the scene's cache manager, made once per process, removed at exit.

    Not the system temporary folder itself: setting a cache folder makes Slicer's cache manager add up the size of
    everything under it, which took 1.3-1.8 s on a machine with a busy /tmp (135 000 files) for every scene.
    Named with the process's pid, so that the parent of a child that was killed can remove it
    (:func:`remove_cache_dir_of`)."""
    if not _CACHE_DIR or _CACHE_DIR[0][0] != os.getpid():
        _CACHE_DIR.clear()   # the parent's (copied by fork): the parent removes it
        path = tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-")
        atexit.register(shutil.rmtree, path, True)
        _CACHE_DIR.append((os.getpid(), path))
    return _CACHE_DIR[0][1]


def remove_cache_dir() -> None:
    """Remove this process's cache folder now (a process that ends with os._exit runs no atexit handler)."""
    while _CACHE_DIR:
        pid, path = _CACHE_DIR.pop()
        if pid == os.getpid():
            shutil.rmtree(path, ignore_errors=True)


def remove_cache_dir_of(pid: int) -> None:
    """Remove the cache folder of process ``pid``, a child that ended without removing it (killed, or died)."""
    import glob
    for path in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), f"{CACHE_PREFIX}{pid}-*")):
        shutil.rmtree(path, ignore_errors=True)


class _Module:
    """Stand-in for ``slicer.modules.<name>`` (only ``logic()`` is needed by slicer.util)."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


@dataclass
class HeadlessSlicer:
    scene: object
    app_logic: object
    logics: dict

    def install(self) -> None:
        """Make this scene the one ``slicer.util`` sees (``slicer.mrmlScene`` and ``slicer.modules``)."""
        import slicer
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(**{k.lower(): _Module(v) for k, v in self.logics.items()})


def _register_segmentation_converters() -> None:
    """Labelmap <-> closed-surface conversion rules (Slicer's Segmentations module registers them at start-up)."""
    import slicer
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {type(r).__name__ for r in factory.GetConverterRules()}
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if cls.__name__ not in have:
            factory.RegisterConverterRule(cls())


def start(install: bool = True) -> HeadlessSlicer:
    """A fresh scene with the logics registered (as Slicer's core application does at start-up).

    With ``install`` the scene becomes ``slicer.mrmlScene``; a scene made later replaces it.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    import slicer
    from vtkmodules.vtkCommonCore import vtkCollection

    scene = slicer.vtkMRMLScene()
    # reading a scene bundle (.mrb) asks the data I/O manager for a cache folder, as in Slicer's core application
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(_cache_dir())
    scene.SetCacheManager(cache)
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    scene.SetDataIOManager(io_manager)
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    # node classes Slicer's Qt modules register (colour legends: the Colors module)
    for cls_name in ("vtkMRMLColorLegendDisplayNode",):
        cls = getattr(slicer, cls_name, None)
        if cls is not None:
            scene.RegisterNodeClass(cls())
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetSliceLogics(vtkCollection())
    app.SetViewLogics(vtkCollection())
    slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app)

    _register_segmentation_converters()
    logics = {}
    # Terminologies are left out: slicer-core ships no terminology files, and nothing here needs them.
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("Transforms", slicer.vtkSlicerTransformLogic),
                      ("Tables", slicer.vtkSlicerTablesLogic),
                      ("Plots", slicer.vtkSlicerPlotsLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    logics["Colors"] = app.GetColorLogic()
    hs = HeadlessSlicer(scene, app, logics)
    if install:
        hs.install()
    return hs

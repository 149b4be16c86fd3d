"""The MRML adapter inside a real Slicer (ctest in a Slicer build tree; it cannot run in this project's CI).

Two hand-checkable cases, the same as the headless pytest suite checks on slicer-core: the LPS <-> RAS geometry of
a volume node, and a prior dose read through a translation transform node.
"""

import unittest

import numpy as np
import slicer


class ReirradiationNPCMRMLSlicerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        """The engine needs PyYAML (not shipped with Slicer): installed here, or every test is skipped saying why."""
        try:
            import yaml  # noqa: F401
        except ImportError:
            try:
                slicer.util.pip_install("PyYAML>=6.0")
                import yaml  # noqa: F401,F811
            except Exception as exc:  # noqa: BLE001 - offline: skip explicitly, with the reason
                raise unittest.SkipTest(f"PyYAML is not installed and could not be installed: {exc}")

    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_geometry_by_hand(self):
        from ReirradiationNPCLib import mrml
        from ReirradiationNPCLib.geometry import Grid, Volume
        node = mrml.add_volume_node(Volume(np.zeros((4, 3, 2), np.float32),
                                           Grid((2, 3, 4), (10.0, 20.0, 30.0), (2.0, 3.0, 4.0))), "v")
        self.assertEqual([round(v, 6) for v in node.GetOrigin()], [-10.0, -20.0, 30.0])

    def test_prior_dose_through_translation(self):
        """Prior dose 30 + 0.5 x Gy in its own LPS frame, shifted +5 mm in LPS x by its transform node: at the
        evaluation point x = 0 mm the dose read is 30 + 0.5 (0 - 5) = 27.5 Gy."""
        import vtk

        from ReirradiationNPCLib import mrml
        from ReirradiationNPCLib.geometry import Grid, Volume
        cur = Grid((9, 5, 5), (-8.0, -4.0, -4.0), (2.0, 2.0, 2.0))
        prior_grid = Grid((40, 12, 12), (-40.0, -12.0, -12.0), (2.0, 2.0, 2.0))
        x = prior_grid.index_to_physical(np.array([[i, 0, 0] for i in range(40)], float))[:, 0]
        prior = np.broadcast_to((30.0 + 0.5 * x)[None, None, :], prior_grid.shape).astype(np.float32).copy()
        prior_node = mrml.add_volume_node(Volume(prior, prior_grid), "prior")
        cur_node = mrml.add_volume_node(Volume(np.full(cur.shape, 2.0, np.float32), cur), "current")
        t = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        m = vtk.vtkMatrix4x4()
        m.SetElement(0, 3, -5.0)  # +5 mm in LPS x is -5 mm in RAS x
        t.SetMatrixTransformToParent(m)
        prior_node.SetAndObserveTransformNodeID(t.GetID())
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.CreateDefaultDisplayNodes()
        mrml.add_segment(seg, "Brainstem", np.ones((1, 1, 1), bool), (slice(2, 3), slice(2, 3), slice(4, 5)), cur,
                         (1, 1, 0))
        prep = mrml.prepare_from_nodes([mrml.CourseInput("prior", prior_node, 30, 24.0),
                                        mrml.CourseInput("current", cur_node, 10)], seg, "synthetic-demo")
        self.assertAlmostEqual(float(prep.courses[0].dose[2, 2, 4]), 27.5, places=3)

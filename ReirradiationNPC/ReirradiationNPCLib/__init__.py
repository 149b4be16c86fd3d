"""ReirradiationNPC engine: cumulative EQD2 for re-irradiation of recurrent nasopharyngeal carcinoma.

Pure Python (numpy, SimpleITK, pydicom); never imports slicer, qt or vtk.
"""

__version__ = "0.1.0"
SOFTWARE_NAME = "ReirradiationNPC"

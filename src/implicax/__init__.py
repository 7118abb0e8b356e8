"""implicax: differentiate through root and fixed-point solves by the implicit function theorem."""

from ._config import SolveStats as SolveStats
from ._implicit import fixed_point_solve as fixed_point_solve
from ._implicit import root_solve as root_solve
from ._linear import CG as CG
from ._linear import GMRES as GMRES
from ._linear import BiCGStab as BiCGStab
from ._linear import Dense as Dense
from ._linear import Neumann as Neumann
from ._solvers import Anderson as Anderson
from ._solvers import Broyden as Broyden
from ._solvers import FixedPointIteration as FixedPointIteration
from ._solvers import Newton as Newton

__version__ = "0.1.0"

__all__ = [
    "Anderson",
    "BiCGStab",
    "Broyden",
    "CG",
    "Dense",
    "FixedPointIteration",
    "GMRES",
    "Neumann",
    "Newton",
    "SolveStats",
    "fixed_point_solve",
    "root_solve",
]

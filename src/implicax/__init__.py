"""implicax: differentiate through root and fixed-point solves by the implicit function theorem."""

from ._decorators import custom_fixed_point as custom_fixed_point
from ._decorators import custom_root as custom_root
from ._failure import FailurePolicy as FailurePolicy
from ._failure import SolveError as SolveError
from ._failure import SolveStats as SolveStats
from ._failure import read_probe as read_probe
from ._failure import stats_probe as stats_probe
from ._forward import AbstractForwardSolver as AbstractForwardSolver
from ._forward import CallableSolver as CallableSolver
from ._forward import Problem as Problem
from ._forward import Progress as Progress
from ._krylov import CG as CG
from ._krylov import GMRES as GMRES
from ._krylov import BiCGStab as BiCGStab
from ._krylov import Neumann as Neumann
from ._linear import AbstractIterativeLinearSolver as AbstractIterativeLinearSolver
from ._linear import AbstractLinearSolver as AbstractLinearSolver
from ._linear import Budget as Budget
from ._linear import CallableLinearSolver as CallableLinearSolver
from ._linear import Dense as Dense
from ._solve import fixed_point_solve as fixed_point_solve
from ._solve import root_solve as root_solve
from ._solvers import Anderson as Anderson
from ._solvers import Broyden as Broyden
from ._solvers import FixedPointIteration as FixedPointIteration
from ._solvers import Newton as Newton
from ._training import JacobianFree as JacobianFree
from ._training import PhantomGradient as PhantomGradient
from ._training import jacobian_penalty as jacobian_penalty
from ._training import spectral_radius as spectral_radius

__version__ = "0.1.0"

__all__ = [
    "AbstractForwardSolver",
    "AbstractIterativeLinearSolver",
    "AbstractLinearSolver",
    "Anderson",
    "BiCGStab",
    "Broyden",
    "Budget",
    "CG",
    "CallableLinearSolver",
    "CallableSolver",
    "Dense",
    "FailurePolicy",
    "FixedPointIteration",
    "GMRES",
    "JacobianFree",
    "Neumann",
    "Newton",
    "PhantomGradient",
    "Problem",
    "Progress",
    "SolveError",
    "SolveStats",
    "custom_fixed_point",
    "custom_root",
    "fixed_point_solve",
    "jacobian_penalty",
    "read_probe",
    "root_solve",
    "spectral_radius",
    "stats_probe",
]

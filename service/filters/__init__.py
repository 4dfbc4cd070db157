"""The math: networks, likelihoods and online filters, in pure PyTorch.

No web, storage or metrics code is imported here. States are frozen dataclasses of tensors and
every function is pure. Symbols and equations: ``docs/algorithms.md``.
"""

from service.filters.algorithm import Algorithm, Belief
from service.filters.base import Linearization, Predictive, RowReport, StepInfo, row_reports
from service.filters.counts import Poisson
from service.filters.diagonal import Diagonal, DiagState
from service.filters.ekf import EKF, GaussState, Kalman
from service.filters.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood
from service.filters.lofi import LoFi, LoFiState
from service.filters.networks import (
    MLP,
    DenseJacobian,
    Jacobian,
    Linear,
    Network,
    dense_operator,
    jacobian_autodiff,
)
from service.filters.online import Dynamics, OnlineFilter, Prior

__all__ = [
    "EKF",
    "MLP",
    "Algorithm",
    "Belief",
    "Bernoulli",
    "Categorical",
    "DenseJacobian",
    "DiagState",
    "Diagonal",
    "Dynamics",
    "GaussState",
    "Gaussian",
    "Jacobian",
    "Kalman",
    "Likelihood",
    "Linear",
    "Linearization",
    "LoFi",
    "LoFiState",
    "Network",
    "OnlineFilter",
    "Poisson",
    "Predictive",
    "Prior",
    "RowReport",
    "StepInfo",
    "dense_operator",
    "jacobian_autodiff",
    "row_reports",
]

"""The math: networks, likelihoods and online filters, in pure PyTorch.

No web, storage or metrics code is imported here. States are frozen dataclasses of tensors and
every function is pure. Symbols follow ``algorithms.md`` (shared design docs).
"""

from service.filters.base import Linearization, Predictive, StepInfo
from service.filters.diagonal import Diagonal, DiagState
from service.filters.ekf import EKF, GaussState, Kalman
from service.filters.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, Poisson
from service.filters.lofi import LoFi, LoFiState
from service.filters.networks import MLP, Linear, Network, jacobian_autodiff
from service.filters.online import Algorithm, Dynamics, OnlineFilter, Prior

__all__ = [
    "EKF",
    "MLP",
    "Algorithm",
    "Bernoulli",
    "Categorical",
    "DiagState",
    "Diagonal",
    "Dynamics",
    "GaussState",
    "Gaussian",
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
    "StepInfo",
    "jacobian_autodiff",
]

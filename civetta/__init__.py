"""civetta: a numpy autograd engine whose models are compositions of a few axiomatic ops."""

from civetta.meters import activation_meter, flop_meter, gemm_log
from civetta.tensor import Tensor, is_grad_enabled, no_grad

__all__ = ["Tensor", "activation_meter", "flop_meter", "gemm_log", "is_grad_enabled", "no_grad"]

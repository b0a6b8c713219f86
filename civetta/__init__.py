"""civetta: a numpy autograd engine whose models are compositions of a few axiomatic ops."""

from civetta.tensor import Tensor, activation_meter, is_grad_enabled, no_grad

__all__ = ["Tensor", "activation_meter", "is_grad_enabled", "no_grad"]

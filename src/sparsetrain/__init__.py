"""sparsetrain: train sparse neural networks by optimization (Bregman learning, xRDA with
adaptive reweighting, HALO) next to the pruning baselines users compare them with."""
from .params import param_groups, prunable_weights

__version__ = "0.1.0"
__all__ = ["param_groups", "prunable_weights", "__version__"]

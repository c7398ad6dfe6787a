"""sparsetrain: train sparse neural networks by optimization (Bregman learning, xRDA with
adaptive reweighting, HALO) next to the pruning baselines users compare them with.

    import sparsetrain
    summary = sparsetrain.train(method="linbreg", model="lenet300", epochs=20, sparsity=0.98)
"""
from . import data, init, metrics, models, optim, regularizers
from .controller import BudgetController, SparsityController
from .params import param_groups, prunable_weights
from .trainer import TrainConfig, Trainer, train

__version__ = "0.1.0"
__all__ = ["train", "TrainConfig", "Trainer", "param_groups", "prunable_weights", "BudgetController",
           "SparsityController", "data", "init",
           "metrics", "models", "optim", "regularizers", "__version__"]

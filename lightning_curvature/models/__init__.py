"""Models: :class:`MLP`, :class:`LeNet5` and the SGD/NGD :class:`ImageClassifier`."""

from .classifier import ImageClassifier
from .networks import ACTIVATIONS, MLP, LeNet5, make_activation, num_parameters

__all__ = ["ACTIVATIONS", "MLP", "ImageClassifier", "LeNet5", "make_activation", "num_parameters"]

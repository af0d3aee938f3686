"""Classifiers for 28x28 single-channel images: an MLP and the classic LeNet-5."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_curvature.checks import ArgumentError, check_choice, check_int

__all__ = ["ACTIVATIONS", "MLP", "LeNet5", "make_activation", "num_parameters"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module from its name (one of :data:`ACTIVATIONS`)."""
    return ACTIVATIONS[check_choice("activation", name, sorted(ACTIVATIONS))]()


class MLP(nn.Module):
    """Fully connected classifier: flatten, then ``Linear -> activation`` per hidden layer.

    Parameters
    ----------
    input_size : int
        Number of input features after flattening (784 for 28x28 images).
    hidden_sizes : sequence of int
        Widths of the hidden layers; empty gives multinomial logistic regression.
    num_classes : int
        Number of outputs (logits).
    activation : str
        One of :data:`ACTIVATIONS`.

    Notes
    -----
    Parameter count: ``sum((a + 1) * b)`` over consecutive widths ``(a, b)`` of
    ``[input_size, *hidden_sizes, num_classes]``; 784-256-256-10 has 269,322.
    """

    #: ``forward(x)`` is exactly ``self.net(x)``: landscape grids may evaluate ``net``
    #: directly (:func:`~lightning_curvature.landscape.stem.find_linear_stem`).
    forward_module = "net"

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (256, 256),
        num_classes: int = 10,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        input_size = check_int("input_size", input_size, minimum=1)
        num_classes = check_int("num_classes", num_classes, minimum=2)
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
            raise ArgumentError(
                f"`hidden_sizes` must be a sequence of integers >= 1, got {hidden_sizes!r}"
            )
        hidden_sizes = [
            check_int(f"hidden_sizes[{i}]", h, minimum=1) for i, h in enumerate(hidden_sizes)
        ]
        make_activation(activation)  # validates the name before building anything
        self.input_size = input_size
        self.hidden_sizes = tuple(hidden_sizes)
        self.num_classes = num_classes
        widths = [input_size, *hidden_sizes]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), make_activation(activation)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) for 28x28 inputs.

    ``conv 6@5x5 (padding 2) -> act -> pool 2 -> conv 16@5x5 -> act -> pool 2 -> fc 120 -> act
    -> fc 84 -> act -> fc num_classes``. The padding makes 28x28 inputs behave like the original
    32x32 ones, so the classic 61,706 parameters result for 10 classes.

    Parameters
    ----------
    num_classes : int
        Number of outputs (logits).
    activation : str
        One of :data:`ACTIVATIONS` (the 1998 paper used a scaled tanh; ReLU is the modern default).
    pooling : {"max", "avg"}
        Subsampling layer (the paper's was a trainable average).
    """

    def __init__(self, num_classes: int = 10, activation: str = "relu", pooling: str = "max"):
        super().__init__()
        num_classes = check_int("num_classes", num_classes, minimum=2)
        check_choice("pooling", pooling, ("max", "avg"))
        make_activation(activation)
        pool = nn.MaxPool2d if pooling == "max" else nn.AvgPool2d
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),
            make_activation(activation),
            pool(2),
            nn.Conv2d(6, 16, kernel_size=5),
            make_activation(activation),
            pool(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            make_activation(activation),
            nn.Linear(120, 84),
            make_activation(activation),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # (N, 28, 28) without a channel axis
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


def num_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

"""Models as functions of a flat parameter vector, batched over clients.

The paper's model is multinomial logistic regression: one linear layer with
bias, softmax, cross-entropy (Section 6.1). Its parameters are one flat vector
w = [vec(W) (C x d, row-major), b (C)] — the layout of
``torch.nn.utils.parameters_to_vector(nn.Linear(d, C))`` — and ||w|| is the
norm the server clips (bias included). Every model here exposes the same three
batched operations over K parameter vectors at once:

- ``logits(params (K, D), X (K, n, d)) -> (K, n, C)``
- ``loss_grad(params (K, D), X (K, n, d), Y (K, n), weight (K, n)) -> (K, D)``:
  the gradient of sum_j weight_j * CE(x_j, y_j) for each of the K models;
- ``init(generator) -> (D,)``.

:class:`LinearModel` computes the gradient in closed form, (P - Y)^T [X, 1]
(Appendix B.6, Eq. 24); :class:`ModuleModel` wraps any ``torch.nn.Module`` with
``torch.func`` (vmap of grad over the client axis) for empirical runs.

A model may own an input bound (``model.input_norm_bound``, :class:`InputBound`): every input it
meets, in training, evaluation and certification, first goes through
P(x) = clamp(x) * min(1, B_0 / ||clamp(x)||), the clamp to the data's box followed by the
projection onto the ball of radius B_0. P is 1-Lipschitz and ||P(x)|| <= B_0 for every x, clean or
triggered, which the certificate then uses as its B_0 (docs/theory.md (g), "An input bound the
model enforces"). Without it the model sees its inputs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crfl.validation import ConfigError, check_choice, check_int, check_real


@dataclass(frozen=True)
class InputBound:
    """The model's input map P(x) = c(x) min(1, B_0 / ||c(x)||), c the clamp to the box [low, high]^d.

    Both steps are Euclidean projections onto convex sets (the box, then the ball of radius B_0;
    the box contains 0, so scaling keeps the point in it), hence 1-Lipschitz and idempotent, and
    ||P(x)|| <= B_0 for every x: a trigger moves an input by at most ||delta|| after the map too,
    and triggered inputs stay within B_0 (docs/theory.md (g)).
    """

    radius: float  # B_0
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        check_real("model.input_norm_bound", self.radius, low=0.0, low_open=True)
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= 0.0 <= self.high):
            raise ConfigError(
                f"The 'input box' parameter must be a finite box [low, high] with low <= 0 <= high. "
                f"Got [{self.low}, {self.high}] instead."
            )

    def apply(self, X: torch.Tensor, x_scale: float = 1.0) -> torch.Tensor:
        """P of the inputs x = x_scale * X (rows of X, any leading shape), in the units of X.

        A new tensor; X is not modified. Norms are taken in the dtype of X (float32 training rounds them).
        """
        inv = 1.0 / x_scale
        Xc = X.clamp(self.low * inv, self.high * inv)
        norm = torch.linalg.vector_norm(Xc, dim=-1, keepdim=True)
        if x_scale != 1.0:
            norm = norm * x_scale
        # min(1, B_0 / ||x||): 1 at x = 0 (clamp_min avoids 0/0)
        factor = torch.clamp(self.radius / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
        return Xc.mul_(factor)

    def describe(self) -> str:
        return f"inputs clamped to [{self.low:g}, {self.high:g}]^d, then projected onto the ball ||x|| <= {self.radius:g}"


def _mapped(bound: InputBound | None, X: torch.Tensor, x_scale: float = 1.0) -> torch.Tensor:
    return X if bound is None else bound.apply(X, x_scale)


def _softmax(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (small) axis; torch.softmax is an order of magnitude slower for C ~ 10 on CPU."""
    e = (z - z.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


@dataclass(frozen=True)
class LinearModel:
    """Multinomial logistic regression with bias (the paper's model)."""

    num_features: int
    num_classes: int
    is_linear: bool = True
    name: str = "logistic"
    input_bound: InputBound | None = None  # the input map P (None: inputs as given)

    @property
    def num_params(self) -> int:
        return self.num_classes * self.num_features + self.num_classes

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (..., C, d), b (..., C)) views of flat parameters (..., D)."""
        cd = self.num_classes * self.num_features
        lead = params.shape[:-1]
        return params[..., :cd].reshape(*lead, self.num_classes, self.num_features), params[..., cd:]

    #: the model can take unscaled inputs and fold the input scale into its (much smaller) weights
    folds_input_scale: bool = True

    def input_map(self, X: torch.Tensor, x_scale: float = 1.0) -> torch.Tensor:
        """The inputs the linear layer sees: P(X) with the model's input bound, else X itself."""
        return _mapped(self.input_bound, X, x_scale)

    def logits(self, params: torch.Tensor, X: torch.Tensor, x_scale: float = 1.0) -> torch.Tensor:
        """Logits of K models on (K, n, d) inputs; the inputs are x_scale * X (then the input map)."""
        return self._affine(params, self.input_map(X, x_scale), x_scale)

    def _affine(self, params: torch.Tensor, X: torch.Tensor, x_scale: float) -> torch.Tensor:
        W, b = self.split(params)
        if x_scale != 1.0:
            W = W * x_scale
        return torch.baddbmm(b.unsqueeze(1), X, W.transpose(1, 2))

    def loss_grad(
        self, params: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, weight: torch.Tensor, x_scale: float = 1.0
    ) -> torch.Tensor:
        """d/dw sum_j weight_j * CE(softmax(W x_j + b), y_j) = sum_j weight_j (P_j - e_{y_j}) [x_j; 1]^T.

        The inputs are x = x_scale * X: scaling the weights (K C d numbers) instead of the inputs
        (K n_B d numbers) saves a pass over every batch (uint8 pixels enter as 0..255 floats).
        With an input bound the gradient is taken at the mapped inputs P(x) (the map has no parameters).
        """
        X = self.input_map(X, x_scale)
        G = _softmax(self._affine(params, X, x_scale))
        G.scatter_add_(-1, Y.unsqueeze(-1), -torch.ones_like(Y, dtype=G.dtype).unsqueeze(-1))
        G.mul_(weight.unsqueeze(-1))
        gW = torch.bmm(G.transpose(1, 2), X)
        if x_scale != 1.0:
            gW.mul_(x_scale)
        gb = G.sum(dim=1)
        return torch.cat([gW.flatten(1), gb], dim=1)

    def sgd_step_shared_(
        self, W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, weight: torch.Tensor, lr: float,
        x_scale: float = 1.0,
    ) -> None:
        """One SGD step, in place, of K models per client that all see the client's batch.

        W (N, K C, d) and b (N, K, C) hold the K models of each of N clients; X (N, n, d), Y and
        weight (N, n) are the clients' batches (inputs x_scale * X). The logits of all K models are one
        wide product X (n, d) @ W^T (d, K C) per client, and the gradient step is fused into the second
        product (W <- W - lr x_scale G^T X): the mixture certificate's continuations share the run's
        batches, so this replaces K skinny products by one.
        """
        X = self.input_map(X, x_scale)
        N, KC, _ = W.shape
        C = self.num_classes
        K, n = KC // C, X.shape[1]
        G = _softmax(torch.baddbmm(b.view(N, 1, KC), X, W.transpose(1, 2), alpha=x_scale).view(N, n, K, C))
        G.scatter_add_(-1, Y.view(N, n, 1, 1).expand(N, n, K, 1), torch.full((N, n, K, 1), -1.0, dtype=G.dtype))
        G.mul_(weight.view(N, n, 1, 1))
        W.baddbmm_(G.view(N, n, KC).transpose(1, 2), X, alpha=-lr * x_scale)
        b.sub_(G.sum(dim=1), alpha=lr)

    def predict(self, params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Predicted classes of one parameter vector (D,) on inputs X (n, d)."""
        W, b = self.split(params)
        return torch.addmm(b, self.input_map(X), W.T).argmax(dim=1)

    def init(self, generator: torch.Generator, dtype: torch.dtype = torch.float32, kind: str = "default") -> torch.Tensor:
        """PyTorch's nn.Linear initialisation U(-1/sqrt(d), 1/sqrt(d)) from an explicit generator, or zeros."""
        if kind == "zeros":
            return torch.zeros(self.num_params, dtype=dtype)
        bound = 1.0 / math.sqrt(self.num_features)
        return (torch.rand(self.num_params, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)

    def to_module(self, params: torch.Tensor) -> nn.Linear:
        lin = nn.Linear(self.num_features, self.num_classes)
        W, b = self.split(params)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        return lin


class ModuleModel:
    """Any ``torch.nn.Module`` mapping (n, d) inputs to (n, C) logits, batched over clients with torch.func."""

    is_linear = False
    folds_input_scale = False

    def __init__(
        self, module: nn.Module, num_features: int, num_classes: int, name: str = "module",
        input_bound: InputBound | None = None,
    ) -> None:
        self.module = module
        self.input_bound = input_bound
        self.num_features = num_features
        self.num_classes = num_classes
        self.name = name
        self._names = [n for n, _ in module.named_parameters()]
        self._shapes = [p.shape for _, p in module.named_parameters()]
        self._sizes = [p.numel() for _, p in module.named_parameters()]

    @property
    def num_params(self) -> int:
        return sum(self._sizes)

    def unflatten(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = params.shape[:-1]
        parts = torch.split(params, self._sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self._names, parts, self._shapes)}

    def input_map(self, X: torch.Tensor, x_scale: float = 1.0) -> torch.Tensor:
        """The inputs the module sees: P(X) with the model's input bound, else X itself."""
        return _mapped(self.input_bound, X, x_scale)

    def _call(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.module, p, (self.input_map(x),))

    def logits(self, params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return torch.vmap(self._call)(self.unflatten(params), X)

    def loss_grad(self, params: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return (F.cross_entropy(self._call(p, x), y, reduction="none") * w).sum()

        grads = torch.vmap(torch.func.grad(loss))(self.unflatten(params), X, Y, weight)
        return torch.cat([grads[n].flatten(1) for n in self._names], dim=1)

    def predict(self, params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return self._call(self.unflatten(params), X).argmax(dim=1)

    def init(self, generator: torch.Generator, dtype: torch.dtype = torch.float32, kind: str = "default") -> torch.Tensor:
        """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every parameter (fan_in of the layer it belongs to)."""
        if kind == "zeros":
            return torch.zeros(self.num_params, dtype=dtype)
        parts = []
        fan_in = self.num_features
        for shape, size in zip(self._shapes, self._sizes):
            if len(shape) >= 2:
                fan_in = int(math.prod(shape[1:]))
            bound = 1.0 / math.sqrt(fan_in)
            parts.append((torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
        return torch.cat(parts).to(dtype)

    def to_module(self, params: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(params.to(next(self.module.parameters()).dtype), self.module.parameters())
        return self.module


Model = LinearModel | ModuleModel

_MODELS: dict[str, Callable[..., Model]] = {}


def _mlp(num_features: int, num_classes: int, hidden: int = 64, input_bound: InputBound | None = None) -> ModuleModel:
    hidden = check_int("model.hidden", hidden, low=1)
    net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return ModuleModel(net, num_features, num_classes, name="mlp", input_bound=input_bound)


def _logistic(num_features: int, num_classes: int, input_bound: InputBound | None = None) -> LinearModel:
    return LinearModel(num_features, num_classes, input_bound=input_bound)


_MODELS["logistic"] = _logistic
_MODELS["mlp"] = _mlp


def model_names() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, num_features: int, num_classes: int, **options: object) -> Model:
    """Build a registered model: ``logistic`` (the paper's) or ``mlp`` (empirical runs only)."""
    check_choice("model.name", name, model_names())
    return _MODELS[name](num_features, num_classes, **options)


def wrap_module(module: nn.Module, num_features: int, num_classes: int, input_bound: InputBound | None = None) -> Model:
    """Use any torch.nn.Module; an ``nn.Linear`` becomes the closed-form LinearModel."""
    if isinstance(module, nn.Linear) and module.bias is not None:
        return LinearModel(module.in_features, module.out_features, input_bound=input_bound)
    return ModuleModel(module.float(), num_features, num_classes, name=type(module).__name__, input_bound=input_bound)

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

from crfl import registry
from crfl.validation import ConfigError, check_int, check_real, fail


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

_MODELS: registry.Entries[Callable[..., Model]] = {}


def register_model(name: str, description: str) -> Callable[[Callable[..., Model]], Callable[..., Model]]:
    """Decorator: register ``builder(num_features, num_classes, input_bound=None, **options) -> Model`` as ``model.name``."""
    return registry.register(_MODELS, name, description)


def describe_models() -> dict[str, str]:
    return registry.describe(_MODELS)


def _mlp(num_features: int, num_classes: int, hidden: int = 64, input_bound: InputBound | None = None) -> ModuleModel:
    hidden = check_int("model.hidden", hidden, low=1)
    net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return ModuleModel(net, num_features, num_classes, name="mlp", input_bound=input_bound)


def _logistic(num_features: int, num_classes: int, input_bound: InputBound | None = None) -> LinearModel:
    return LinearModel(num_features, num_classes, input_bound=input_bound)


register_model("logistic", "multinomial logistic regression, the paper's model (convex: certified radii)")(_logistic)
register_model("mlp", "one hidden ReLU layer (option hidden); empirical runs, no certified radius")(_mlp)


# ---------------------------------------------------------------------------------------------
# a small CNN, batched over clients as one grouped convolution


class LeNet(nn.Module):
    """LeNet-5-style CNN on flat (n, side*side) inputs (LeCun et al., 1998, without the 84-unit layer).

    conv 5x5 (``channels[0]``, padding 2) -> max-pool 2 -> ReLU -> conv 5x5 (``channels[1]``) ->
    max-pool 2 -> ReLU -> fc (``hidden``) -> ReLU -> fc (num_classes). The second convolution
    is unpadded for side >= 20 (LeNet-5's geometry: 28 -> 14 -> 10 -> 5) and padded by 2 for
    smaller images, which keep their size through it (8 -> 4 -> 4 -> 2); side >= 4.
    Max-pooling before the ReLU computes the same function as after it (both are monotone) on
    a quarter of the values.
    """

    def __init__(self, side: int, num_classes: int, channels: tuple[int, int] = (6, 16), hidden: int = 64) -> None:
        super().__init__()
        c1, c2 = channels
        self.side = side
        self.pad2 = 0 if side >= 20 else 2
        s3 = (side // 2 + 2 * self.pad2 - 4) // 2
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=self.pad2)
        self.fc1 = nn.Linear(c2 * s3 * s3, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, 1, self.side, self.side)
        h = F.relu(F.max_pool2d(self.conv1(h), 2))
        h = F.relu(F.max_pool2d(self.conv2(h), 2))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


class CNNModel(ModuleModel):
    """:class:`LeNet` batched over K clients without vmap: the K models are one grouped convolution.

    Client k's batch X_k (n, side^2) meets only its own weights w_k: stacking the K batches
    along channels, (n, K, side, side), a convolution with groups = K and the K weight sets
    stacked along output channels applies w_k to X_k alone, and the fully connected layers are
    batched products (``bmm``) over K. The gradient of sum_k sum_j weight_kj CE_kj is then one
    autograd pass over that graph; client k's rows of it are the gradient of its own loss
    (no term couples two clients). The activations are kept channels-last (N, H, W, K C
    physically), the layout in which oneDNN's grouped convolutions are fast. ``nn.Module`` code
    (``module``, ``predict``, Monte Carlo smoothing) sees the plain :class:`LeNet`.

    Memory: the clients are processed in chunks of at most ``chunk_images`` images (at least
    one client per chunk), so the autograd working set is bounded by about
    ``chunk_images * bytes_per_image`` (see :attr:`bytes_per_image`) plus the (K, D)
    parameters and gradients, whatever K is (measured on 28x28: about 57 KB per image, within the
    154 KB estimate). The default 512 is also the fastest on a 2-core CPU (about 26k images/s for
    K = 1000, n_B = 10, against 15k in one 10k-image chunk: the working set stays in cache).
    """

    def __init__(self, net: LeNet, num_features: int, num_classes: int, chunk_images: int = 512,
                 input_bound: InputBound | None = None) -> None:
        super().__init__(net, num_features, num_classes, name="cnn", input_bound=input_bound)
        self.net = net
        self.chunk_images = check_int("chunk_images", chunk_images, low=1)

    @property
    def bytes_per_image(self) -> int:
        """Upper estimate of the activations (and their gradients) one image keeps alive in :meth:`loss_grad`."""
        net, s = self.net, self.net.side
        c1, c2 = net.conv1.out_channels, net.conv2.out_channels
        s2 = s // 2
        s2c = s2 + 2 * net.pad2 - 4
        floats = c1 * s * s * 2 + c1 * s2 * s2 * 4 + c2 * s2c * s2c * 2 + c2 * (s2c // 2) ** 2 * 4
        floats += 4 * (net.fc1.out_features + self.num_classes)
        return floats * 4 * 2  # float32 values + int64 pooling indices, generously

    def _grouped_logits(self, p: dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
        """Logits (K, n, C) of the K parameter sets in ``p`` (leading axis K) on X (K, n, d)."""
        net = self.net
        X = self.input_map(X)
        K, n, _ = X.shape
        s = net.side
        c1, c2 = net.conv1.out_channels, net.conv2.out_channels
        # (n, K, s, s), client k as input channel k, stored channels-last: oneDNN's grouped convolutions
        # (forward and backward) run 3-8x faster on CPU in that layout than in NCHW
        h = X.reshape(K, n, s, s).transpose(0, 1).contiguous(memory_format=torch.channels_last)
        h = F.conv2d(h, p["conv1.weight"].reshape(K * c1, 1, 5, 5), p["conv1.bias"].reshape(K * c1), padding=2, groups=K)
        h = F.relu(F.max_pool2d(h, 2))
        w2 = p["conv2.weight"].reshape(K * c2, c1, 5, 5)
        h = F.conv2d(h, w2, p["conv2.bias"].reshape(K * c2), padding=net.pad2, groups=K)
        h = F.relu(F.max_pool2d(h, 2))  # (n, K c2, s3, s3)
        h = h.reshape(n, K, -1).transpose(0, 1)  # (K, n, c2 s3 s3): the nn.Flatten order per client
        h = F.relu(torch.baddbmm(p["fc1.bias"].unsqueeze(1), h, p["fc1.weight"].transpose(1, 2)))
        return torch.baddbmm(p["fc2.bias"].unsqueeze(1), h, p["fc2.weight"].transpose(1, 2))

    @torch.no_grad()
    def logits_shared(self, params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Logits (m, n, C) of m parameter vectors (m, D) on the same inputs X (n, d), e.g. the noisy
        models w + sigma_T eps_j of Monte Carlo smoothing (Algorithm 2's GetCounts).

        With the inputs shared, the first convolution is one ordinary convolution with m c1 output
        channels and only the second is grouped (groups = m). Points go in chunks of
        max(1, chunk_images // m), so that at most about ``chunk_images`` image-model pairs are
        alive; measured on 28x28 with m = 64: 5-10x the throughput of torch.vmap over
        ``functional_call`` of the module (60k-120k against 12k model-image evaluations/s, 2 cores).
        """
        net = self.net
        X = self.input_map(X)
        m, s = params.shape[0], net.side
        c1, c2 = net.conv1.out_channels, net.conv2.out_channels
        p = self.unflatten(params)
        w1, b1 = p["conv1.weight"].reshape(m * c1, 1, 5, 5), p["conv1.bias"].reshape(m * c1)
        w2, b2 = p["conv2.weight"].reshape(m * c2, c1, 5, 5), p["conv2.bias"].reshape(m * c2)
        out = []
        step = max(1, self.chunk_images // m)
        for i in range(0, X.shape[0], step):
            x = X[i : i + step].reshape(-1, 1, s, s)
            n = x.shape[0]
            h = F.conv2d(x, w1, b1, padding=2).contiguous(memory_format=torch.channels_last)
            h = F.relu(F.max_pool2d(h, 2))
            h = F.relu(F.max_pool2d(F.conv2d(h, w2, b2, padding=net.pad2, groups=m), 2))
            h = h.reshape(n, m, -1).transpose(0, 1)
            h = F.relu(torch.baddbmm(p["fc1.bias"].unsqueeze(1), h, p["fc1.weight"].transpose(1, 2)))
            out.append(torch.baddbmm(p["fc2.bias"].unsqueeze(1), h, p["fc2.weight"].transpose(1, 2)))
        if not out:
            return torch.zeros(m, 0, self.num_classes, dtype=params.dtype)
        return torch.cat(out, dim=1)

    def _rows(self, n: int) -> int:
        return max(1, self.chunk_images // max(n, 1))

    def logits(self, params: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        r = self._rows(X.shape[1])
        return torch.cat([self._grouped_logits(self.unflatten(params[i : i + r]), X[i : i + r]) for i in range(0, len(params), r)])

    def loss_grad(self, params: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Rows k of d/dw sum_j weight_kj CE(f(w_k, x_kj), y_kj): one autograd pass per chunk of clients."""
        K, n, _ = X.shape
        r = self._rows(n)
        out = torch.empty_like(params)
        with torch.enable_grad():
            for i in range(0, K, r):
                P = params[i : i + r].detach().requires_grad_(True)
                z = self._grouped_logits(self.unflatten(P), X[i : i + r])
                loss = (F.cross_entropy(z.flatten(0, 1), Y[i : i + r].flatten(), reduction="none") * weight[i : i + r].flatten()).sum()
                (out[i : i + r],) = torch.autograd.grad(loss, P)
        return out


def _cnn(num_features: int, num_classes: int, hidden: int = 64, channels: tuple[int, int] = (6, 16),
         input_bound: InputBound | None = None) -> CNNModel:
    hidden = check_int("model.hidden", hidden, low=1)
    side = math.isqrt(num_features)
    if side * side != num_features or side < 4:
        raise ConfigError(
            f"The 'model.name' parameter 'cnn' needs square images of side >= 4 (num_features = side * side). "
            f"Got num_features = {num_features} instead."
        )
    if not (isinstance(channels, (tuple, list)) and len(channels) == 2):
        raise fail("model.channels", "a pair of integers >= 1", channels)
    c1, c2 = (check_int("model.channels", c, low=1) for c in channels)
    return CNNModel(LeNet(side, num_classes, (c1, c2), hidden), num_features, num_classes, input_bound=input_bound)


register_model("cnn", "a small LeNet for image data (options hidden, channels); empirical runs, no certified radius")(_cnn)


def model_names() -> list[str]:
    return registry.names(_MODELS)


def build_model(name: str, num_features: int, num_classes: int, **options: object) -> Model:
    """Build a registered model: ``logistic`` (the paper's), ``mlp`` or ``cnn`` (empirical runs only)."""
    return registry.lookup(_MODELS, "model.name", name)(num_features, num_classes, **options)


def wrap_module(module: nn.Module, num_features: int, num_classes: int, input_bound: InputBound | None = None) -> Model:
    """Use any torch.nn.Module; an ``nn.Linear`` becomes the closed-form LinearModel."""
    if isinstance(module, nn.Linear) and module.bias is not None:
        return LinearModel(module.in_features, module.out_features, input_bound=input_bound)
    return ModuleModel(module.float(), num_features, num_classes, name=type(module).__name__, input_bound=input_bound)

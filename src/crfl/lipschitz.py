"""L_Z, the Lipschitz constant of the loss gradient with respect to the data (Assumption 2).

For multinomial logistic regression with bias (the paper's model: logits
z = W x + b, softmax P, cross-entropy with one-hot label Y), parameters
w = (W, b), the per-sample gradient is

    G(x) = d ell / d(W, b) = (P(x) - Y) x~^T,   x~ = [x; 1]   (Appendix B.6, Eq. 24, with bias)

and L_Z bounds ||G(x) - G(x')|| / ||x - x'|| for the same label y (Lemma 1).

- :func:`lz_paper`: Lemma 1 as printed, sqrt(2 + 2 rho + rho^2). Its proof uses
  ||x|| <= 1 (``as ||x|| <= 1``, Appendix B.6); for image inputs in [0, 1]^784,
  ||x|| is about 9-10 and the constant is *not* an upper bound (docs/theory.md (b)
  gives a counterexample).
- :func:`lz_sound`: valid for ||x||, ||x'|| <= B and ||w|| <= rho over all parameters
  (bias included):

      L_Z = (rho / 2) sqrt(B^2 + 1) + sqrt(2).

  Proof (docs/theory.md (b)): along a direction u (||u|| = 1) the derivative of G is
  (S W u) x~^T + (P - Y)[u; 0]^T with S = diag(P) - P P^T; ||S||_2 <= 1/2,
  ||W||_2 <= ||W||_F <= rho, ||x~|| <= sqrt(B^2 + 1), ||P - Y||_2 <= sqrt(2); the mean
  value inequality on the segment [x', x] (inside the ball of radius B) finishes it.
  The constant is tight up to the additive sqrt(2): ratios of
  sqrt(rho^2 (B^2 + 1) / 4 + 3/2) are approached (C >= 3).

Helpers for tests and diagnostics compute the exact per-sample gradient in closed
form (:func:`cross_entropy_gradient`) and the ratio above
(:func:`gradient_difference_ratio`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from crfl.validation import ConfigError, check_real

__all__ = [
    "centred_operator_norm",
    "centred_column_norms",
    "lz_centred",
    "lz_support",
    "SupportGeometry",
    "support_norm_bound",
    "support_opnorm_bound",
    "off_support_share",
    "smoothness_bound",
    "lz_paper",
    "lz_sound",
    "input_norm_bound",
    "cross_entropy_gradient",
    "gradient_difference_ratio",
]


def lz_paper(rho: float) -> float:
    """Lemma 1 as printed: L_Z = sqrt(2 + 2 rho + rho^2) for ||w|| <= rho.

    Valid only under the proof's premise ||x|| <= 1 (Appendix B.6); use
    :func:`lz_sound` otherwise.
    """
    rho = check_real("rho", rho, low=0.0, high=math.inf, high_open=True)
    return math.sqrt(2.0 + 2.0 * rho + rho * rho)


def lz_sound(rho: float, input_norm_bound: float) -> float:
    """A sound L_Z for logistic regression with bias: (rho / 2) sqrt(B^2 + 1) + sqrt(2).

    Args:
        rho: bound on the norm of all parameters (W, b) at which gradients are taken.
        input_norm_bound: B with ||x|| <= B for clean and backdoored inputs.

    Returns:
        L_Z with ||G(x) - G(x')||_F <= L_Z ||x - x'|| for all ||x||, ||x'|| <= B, the same
        label, and ||(W, b)|| <= rho (docs/theory.md, section (b)).
    """
    rho = check_real("rho", rho, low=0.0, high=math.inf, high_open=True)
    B = check_real("input_norm_bound", input_norm_bound, low=0.0, high=math.inf, high_open=True)
    return 0.5 * rho * math.sqrt(B * B + 1.0) + math.sqrt(2.0)


def lz_centred(start_opnorm: float, tau: int, eta: float, input_norm_bound: float) -> float:
    """L_Z along an attacker's local trajectory from a known broadcast model (docs/theory.md (g)).

        L_Z = 1/2 (||P W~||_2 + tau eta sqrt(2) B) sqrt(B^2 + 1) + sqrt(2),

    P = I - 11^T/C the class centring, W~ the broadcast weight matrix (``start_opnorm`` =
    ||P W~||_2, :func:`centred_operator_norm`), B a bound on every input norm the steps see
    (clean and triggered). Each local step changes W by eta times a batch mean of
    (P_j - Y_j) x_j^T, which is already centred (1^T (P_j - Y_j) = 0) and has spectral norm
    <= sqrt(2) B, so after s <= tau steps ||P W_s||_2 <= ||P W~||_2 + tau eta sqrt(2) B; the
    per-sample gradient's derivative in x is bounded by 1/2 ||P W_s||_2 ||x~|| + ||P - Y||.
    The bias does not enter.
    """
    op = check_real("start_opnorm", start_opnorm, low=0.0, high=math.inf, high_open=True)
    tau_ = check_real("tau", tau, low=0.0, high=math.inf, high_open=True)
    eta_ = check_real("eta", eta, low=0.0, high=math.inf, high_open=True)
    B = check_real("input_norm_bound", input_norm_bound, low=0.0, high=math.inf, high_open=True)
    return float(lz_centred_array(op, tau_, eta_, np.float64(B)))


def lz_centred_array(start_opnorm: float, tau: float, eta: float, B: np.ndarray) -> np.ndarray:
    """:func:`lz_centred` for an array of input bounds B (no validation; for the radius solver)."""
    B = np.asarray(B, dtype=np.float64)
    return 0.5 * (start_opnorm + tau * eta * math.sqrt(2.0) * B) * np.sqrt(B * B + 1.0) + math.sqrt(2.0)


def smoothness_bound(input_norm_bound: float) -> float:
    """beta <= (B^2 + 1) / 2 for cross-entropy of logistic regression with bias (Assumption 1).

    The Hessian in (W, b) is (diag P - P P^T) (x) x~ x~^T with ||diag P - P P^T||_2 <= 1/2 and
    ||x~||^2 <= B^2 + 1. A gradient step with eta <= 2 / beta is nonexpansive.
    """
    B = check_real("input_norm_bound", input_norm_bound, low=0.0, high=math.inf, high_open=True)
    return (B * B + 1.0) / 2.0


def centred_operator_norm(weight: torch.Tensor) -> float:
    """||(I - 11^T / C) W||_2, the spectral norm of the class-centred weight matrix W (C, d).

    S = diag(P) - P P^T has S 1 = 0, so S W = S (I - 11^T/C) W and ||S W||_2 <= ||(I - 11^T/C) W||_2 / 2:
    shifting every class row of W by the same vector changes no softmax (docs/theory.md (g)).
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(f"The 'weight' parameter must be a 2-D tensor (C, d). Got {got} instead.")
    W = weight.double()
    Wc = W - W.mean(dim=0, keepdim=True)
    return float(torch.linalg.matrix_norm(Wc, ord=2))


def input_norm_bound(x: torch.Tensor, trigger_x: torch.Tensor | None = None) -> float:
    """B = max ||x|| over the rows of x (n, d) and of its triggered version trigger_x (m, d).

    The inputs must be in the model's input scale (e.g. pixels / 255).
    """
    best = 0.0
    for name, t in (("x", x), ("trigger_x", trigger_x)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConfigError(f"The '{name}' parameter must be a 2-D floating point tensor (n, d). Got {got} instead.")
        if t.shape[0] == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(f"The '{name}' parameter must hold finite values. Got a non-finite entry instead.")
        best = max(best, float(torch.linalg.vector_norm(t.double(), dim=1).max()))
    return best


def cross_entropy_gradient(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact per-sample gradient of CE(softmax(W x + b), y) with respect to (W, b).

    Args:
        weight: (C, d); bias: (C,); x: (n, d); y: (n,) integer labels.

    Returns:
        (n, C*d + C): row j is vec((P_j - Y_j) x_j^T) followed by P_j - Y_j, the layout of
        ``torch.nn.utils.parameters_to_vector`` for ``nn.Linear(d, C)`` (Eq. 24 with bias).
    """
    logits = x @ weight.T + bias
    G = torch.softmax(logits, dim=-1)
    G = G - torch.nn.functional.one_hot(y.long(), weight.shape[0]).to(G.dtype)
    gw = G.unsqueeze(-1) * x.unsqueeze(-2)  # (n, C, d)
    return torch.cat([gw.reshape(x.shape[0], -1), G], dim=1)


def gradient_difference_ratio(
    weight: torch.Tensor, bias: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """||grad ell(w; (x1, y)) - grad ell(w; (x2, y))|| / ||x1 - x2|| per row (Assumption 2's ratio).

    Args:
        weight: (C, d); bias: (C,); x1, x2: (n, d); y: (n,) labels shared by both inputs.
    """
    g1 = cross_entropy_gradient(weight, bias, x1, y)
    g2 = cross_entropy_gradient(weight, bias, x2, y)
    return torch.linalg.vector_norm(g1 - g2, dim=1) / torch.linalg.vector_norm(x1 - x2, dim=1)


# ---------------------------------------------------------------------------------------------
# L_Z for triggers on a known support S (docs/theory.md (g), step 3b)


@dataclass(frozen=True)
class SupportGeometry:
    """What L_Z needs to know about a trigger support S (the input coordinates a trigger may touch).

    Attributes:
        size: |S|.
        start_opnorm: omega_S >= ||(I - 11^T/C) W~_S||_2 of the broadcast model, W~_S its columns on S
            (:func:`support_opnorm_bound`; any upper bound is sound, e.g. the whole ||(I - 11^T/C) W~||_2).
        norm_bound: B_S >= ||v_S|| for every input v the model's local steps see, clean or triggered
            (:func:`support_norm_bound`: sqrt(|S|) max(|low|, |high|) for inputs in the box [low, high]^d).
        enforced: the model projects its (boxed) inputs onto the ball ||v|| <= B_0; the projection's rescaling
            leaks a share kappa <= B_S / B_0 of the trigger outside S (:func:`off_support_share`).
    """

    size: int
    start_opnorm: float
    norm_bound: float
    enforced: bool = False

    def __post_init__(self) -> None:
        check_real("size", self.size, low=1.0, high=math.inf, high_open=True)
        check_real("start_opnorm", self.start_opnorm, low=0.0, high=math.inf, high_open=True)
        check_real("norm_bound", self.norm_bound, low=0.0, high=math.inf, high_open=True)


def support_norm_bound(size: int, low: float, high: float) -> float:
    """B_S = sqrt(|S|) max(|low|, |high|): ||v_S|| for every v in the box [low, high]^d (clean and triggered inputs;
    the trigger is clamped to the box, and a model that projects onto a ball only shrinks v)."""
    n = check_real("size", size, low=0.0, high=math.inf, high_open=True)
    return math.sqrt(n) * max(abs(float(low)), abs(float(high)))


def off_support_share(support_bound: float | np.ndarray, input_norm_bound: float | np.ndarray, enforced: bool) -> np.ndarray:
    """kappa: ||u_off|| <= kappa ||delta|| for the part of the model-input change u outside S.

    Without a ball projection the model sees x' - x = clamp(x + delta) - clamp(x), zero outside S: kappa = 0.
    With the enforced ball (v = a min(1, B_0/||a||), a = clamp(x)) the part outside S is
    (g(||a'||) - g(||a||)) a_off, g(r) = min(1, B_0/r); along the segment a(t) (in the box, ||a(t)_S|| <= B_S),
    |d/dt g(r) ||a_off||| <= (B_0/r^2)(B_S ||delta||/r) r <= B_S ||delta|| / B_0 where r > B_0 (and 0 where
    r < B_0), so kappa = min(1, B_S / B_0) (docs/theory.md (g), step 3b).
    """
    BS = np.asarray(support_bound, dtype=np.float64)
    B = np.asarray(input_norm_bound, dtype=np.float64)
    if not enforced:
        return np.zeros(np.broadcast(BS, B).shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(B > 0, np.minimum(1.0, BS / np.where(B > 0, B, 1.0)), 1.0)


def lz_support(
    start_opnorm: float, tau: int, eta: float, input_norm_bound: float, support: SupportGeometry
) -> float:
    """L_Z for triggers supported on S along an attacker's local trajectory (docs/theory.md (g), step 3b):

        L_Z,S(B) = 1/2 min[(omega_S + tau eta sqrt(2) B_S) + kappa (omega + tau eta sqrt(2) B),
                           omega + tau eta sqrt(2) B] sqrt(B^2 + 1) + sqrt(2),

    omega = ||P W~||_2 (``start_opnorm``), omega_S >= ||P W~_S||_2 (``support.start_opnorm``, capped at omega),
    B_S = min(support.norm_bound, B), kappa = :func:`off_support_share`. For a model-input change u = v' - v
    caused by a trigger on S (||u|| <= ||delta||, ||u_off|| <= kappa ||delta||) the gradient gap is
    (P' - P) v~'^T + (P - Y) [u; 0]^T, and ||P' - P|| <= 1/2 ||P W u|| <= 1/2 (||P W_S|| + kappa ||P W||) ||delta||;
    a local step changes P W_S by eta times a batch mean of centred (P_j - Y_j) v_{j,S}^T of spectral norm
    <= sqrt(2) B_S. The second term of the min is :func:`lz_centred`'s (||P W u|| <= ||P W|| ||u|| holds for any u),
    so L_Z,S never exceeds it.
    """
    op = check_real("start_opnorm", start_opnorm, low=0.0, high=math.inf, high_open=True)
    tau_ = check_real("tau", tau, low=0.0, high=math.inf, high_open=True)
    eta_ = check_real("eta", eta, low=0.0, high=math.inf, high_open=True)
    B = check_real("input_norm_bound", input_norm_bound, low=0.0, high=math.inf, high_open=True)
    if not isinstance(support, SupportGeometry):
        raise ConfigError(f"The 'support' parameter must be a SupportGeometry. Got {type(support).__name__} instead.")
    return float(lz_support_array(op, tau_, eta_, np.float64(B), support))


def lz_support_array(start_opnorm: float, tau: float, eta: float, B: np.ndarray, support: SupportGeometry) -> np.ndarray:
    """:func:`lz_support` for an array of input bounds B (no validation; for the radius solver)."""
    B = np.asarray(B, dtype=np.float64)
    BS = np.minimum(support.norm_bound, B)
    kappa = off_support_share(BS, B, support.enforced)
    on = min(support.start_opnorm, start_opnorm) + tau * eta * math.sqrt(2.0) * BS
    off = start_opnorm + tau * eta * math.sqrt(2.0) * B
    # ||P W u|| <= ||P W_S|| ||u_S|| + ||P W_off|| ||u_off||, and <= ||P W|| ||u|| whatever the support
    return 0.5 * np.minimum(on + kappa * off, off) * np.sqrt(B * B + 1.0) + math.sqrt(2.0)


def centred_column_norms(weight: torch.Tensor) -> np.ndarray:
    """||(I - 11^T/C) w_j|| for every column j of W (C, d): recorded for the broadcast model of an attack round,
    so that :func:`support_opnorm_bound` can bound ||(I - 11^T/C) W_S||_2 for any support S later."""
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(f"The 'weight' parameter must be a 2-D tensor (C, d). Got {got} instead.")
    W = weight.double()
    return torch.linalg.vector_norm(W - W.mean(dim=0, keepdim=True), dim=0).numpy()


def support_opnorm_bound(column_norms: np.ndarray | list[float], support: np.ndarray | list[int]) -> float:
    """omega_S = ||(I - 11^T/C) W_S||_F = sqrt(sum_{j in S} ||(I - 11^T/C) w_j||^2) >= ||(I - 11^T/C) W_S||_2."""
    c = np.asarray(column_norms, dtype=np.float64)
    idx = np.asarray(support, dtype=np.int64)
    if c.ndim != 1 or idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= c.size)):
        raise ConfigError(f"The 'support' parameter must index the {c.size} recorded column norms. Got {idx.tolist()[:10]} instead.")
    return float(math.sqrt(float(np.sum(c[idx] ** 2))))

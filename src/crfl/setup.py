"""A run's setup: the configuration resolved against its data (the layer under Algorithm 1 and 2).

:func:`prepare` turns a :class:`~crfl.config.Config` into a :class:`Setup`: the dataset, the
partition into clients, the model and its initial parameters w_0 (built once, here), tau_i, the
configured aggregation weights p_i, the attack plan and the rho_t / sigma_t schedules. Training
(:mod:`crfl.train`), certification (:mod:`crfl.certify`) and the Flower apps all start from it.
It also owns the conversion of stored rows to model inputs and the per-round evaluation.
"""

from __future__ import annotations

import math
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import crfl
from crfl import aggregation
from crfl.attacks import AttackEnv, AttackPlan, attack_rounds, backdoor_test_mask, build_plan
from crfl.clients import ClientData, local_iterations
from crfl.config import Config
from crfl.data import Dataset, dataset_names, load_dataset
from crfl.data.base import check_dataset
from crfl.data.partition import partition
from crfl.model import InputBound, Model, build_model, wrap_module
from crfl.rng import torch_generator
from crfl.schedule import RhoSchedule, SigmaSchedule
from crfl.validation import ConfigError, check_choice, check_memory, fail


@dataclass
class Setup:
    """Everything a run needs, resolved from the config and the data."""

    cfg: Config
    dataset: Dataset
    model: Model
    data: ClientData
    tau: np.ndarray  # tau_i per client
    weights: torch.Tensor  # configured p_i (or RFA's alpha_i)
    plan: AttackPlan
    rho: RhoSchedule
    sigma: SigmaSchedule
    dtype: torch.dtype
    w0: torch.Tensor  # the initial model w_0 (Algorithm 1's server input), from the run's "init" stream
    #: the per-round evaluation's test inputs; owned by :func:`evaluation_inputs` (filled on first use)
    eval_inputs: dict[str, Any] = field(default_factory=dict, repr=False)
    #: (max ||x||, min x_j, max x_j) of the clean training inputs; owned by
    #: :func:`crfl.readings.base.training_input_stats` (None until computed)
    train_input_stats: tuple[float, float, float] | None = field(default=None, repr=False)

    @property
    def rounds(self) -> int:
        return self.cfg.server.rounds


def resolve_auto(cfg: Config, ds: Dataset) -> Config:
    """Fill the dataset-dependent ``auto`` values (trigger kind, target, trigger features)."""
    a = cfg.attack
    over: dict[str, Any] = {}
    if a.trigger == "auto":
        over["attack.trigger"] = "pixel" if ds.image_shape is not None else "loan"
    if a.target == "auto":
        over["attack.target"] = int(ds.source.get("default_target", 0))
    if a.features is None and ds.image_shape is None:
        feats = ds.source.get("trigger_features")
        if feats:
            over["attack.features"] = list(feats)
    if a.attackers is None:
        over["attack.attackers"] = list(range(a.num_attackers))
    if cfg.data.num_clients is None and cfg.data.partition != "natural":
        raise ConfigError("The 'data.num_clients' parameter must be set for iid and dirichlet partitions. Got None instead.")
    return cfg.replace(**over) if over else cfg


def load_data(cfg: Config) -> Dataset:
    """The config's dataset; ``data.options`` go to its loader (e.g. LOAN's ``categorical``)."""
    import inspect

    from crfl.data.base import loader

    opts = dict(cfg.data.options)
    if cfg.data.name == "mnist-5k":
        opts.setdefault("test_fraction", cfg.data.test_fraction)
    check_choice("data.name", cfg.data.name, dataset_names())
    params = inspect.signature(loader(cfg.data.name)).parameters
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for k in opts:
        if k not in allowed:
            raise ConfigError(
                f"The 'data.options' parameter must hold options of the {cfg.data.name!r} loader "
                f"({', '.join(allowed) or 'none'}). Got {k!r} instead."
            )
    return load_dataset(cfg.data.name, cfg.data.data_dir, seed=cfg.seed, **opts)


def input_bound(cfg: Config, ds: Dataset) -> InputBound | None:
    """The model's input map from ``model.input_norm_bound`` and the dataset's box (None: no map)."""
    if cfg.model.input_norm_bound is None:
        return None
    low, high = ds.input_box
    return InputBound(float(cfg.model.input_norm_bound), low, high)


def prepare(cfg: Config, dataset: Dataset | None = None, module: torch.nn.Module | None = None) -> Setup:
    """Resolve a config against its data: partition, model, tau_i, p_i, attack plan."""
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    ds = dataset if dataset is not None else load_data(cfg)
    check_dataset(ds)
    derived_attackers = cfg.attack.attackers is None
    cfg = resolve_auto(cfg, ds)
    indices = partition(ds, cfg.data.partition, cfg.data.num_clients, cfg.seed, alpha=cfg.data.dirichlet_alpha)
    K = len(indices)
    a = cfg.attack
    if derived_attackers and a.num_attackers > K:
        raise fail("attack.num_attackers", f"an integer in [0, {K}] (at most the number of clients)", a.num_attackers)
    bound = input_bound(cfg, ds)
    if module is not None:
        model = wrap_module(module, ds.num_features, ds.num_classes, input_bound=bound)
    else:
        if cfg.model.name == "mlp":  # an absurd width is refused before torch tries to allocate it
            D = (ds.num_features + 1) * int(cfg.model.hidden) + (int(cfg.model.hidden) + 1) * ds.num_classes
            check_memory("model.hidden", cfg.model.hidden, 4.0 * D * (K + 4), f"an MLP of {D} parameters for {K} clients")
        opts: dict[str, Any] = {"hidden": cfg.model.hidden} if cfg.model.name in ("mlp", "cnn") else {}
        model = build_model(cfg.model.name, ds.num_features, ds.num_classes, input_bound=bound, **opts)
    data = ClientData(
        x=torch.from_numpy(np.ascontiguousarray(ds.x_train)),
        y=torch.from_numpy(np.ascontiguousarray(ds.y_train)).long(),
        input_scale=float(ds.input_scale),
        indices=tuple(np.asarray(ix, dtype=np.int64) for ix in indices),
    )
    sizes = data.sizes
    tau = local_iterations(sizes, cfg.clients.batch_size, cfg.clients.local_iters, cfg.clients.local_epochs)
    check_memory("clients.batch_size", cfg.clients.batch_size, 9.0 * K * int(tau.max(initial=1)) * cfg.clients.batch_size,
                 "one round's batch indices (clients x local steps x batch size)")
    if cfg.clients.weighting == "uniform":
        w = torch.full((K,), 1.0 / K, dtype=torch.float64)
    else:
        n_trained = torch.from_numpy(np.minimum(sizes, tau * cfg.clients.batch_size)).double()
        w = n_trained / n_trained.sum()
    rounds = attack_rounds(a.rounds, a.every, a.start, cfg.server.rounds) if a.num_attackers > 0 else ()
    plan = build_plan(
        num_clients=K,
        attackers=a.attackers or [],
        rounds=rounds,
        poison_per_batch=a.poison_per_batch,
        batch_size=cfg.clients.batch_size,
        target=int(a.target),
        num_classes=ds.num_classes,
        gamma=a.gamma,
        kind=a.trigger,
        magnitude=a.magnitude,
        image_shape=ds.image_shape,
        feature_names=ds.feature_names,
        pixels=a.pixels,
        features=a.features,
        dba_num_parts=a.dba_parts,
        num_features=ds.num_features,
        attack=a.kind,
        attack_options=a.options,
        env=AttackEnv(ds.num_classes, ds.num_features, int(a.target), len(ds.y_test),
                      lambda ix: model_inputs(ds, ds.x_test[list(ix)], torch.float64)),
    )
    check_choice("aggregation.name", cfg.aggregation.name, aggregation.aggregator_names())
    dtype = torch.float32 if cfg.run.dtype == "float32" else torch.float64
    return Setup(
        cfg=cfg,
        dataset=ds,
        model=model,
        data=data,
        tau=tau,
        weights=w,
        plan=plan,
        rho=RhoSchedule.from_config(cfg.server.rho),
        sigma=SigmaSchedule.from_config(cfg.server.sigma, cfg.server.rounds),
        dtype=dtype,
        w0=model.init(torch_generator(cfg.seed, "init"), dtype, cfg.model.init),
    )


# ---------------------------------------------------------------------------------------------
# evaluation


def model_inputs(ds: Dataset, x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows (uint8 pixels, float features) as model inputs x / input_scale."""
    X = torch.as_tensor(x).to(dtype)
    return X / ds.input_scale if ds.input_scale != 1.0 else X


@torch.no_grad()
def predict(setup: Setup, params: torch.Tensor, x: np.ndarray | torch.Tensor, trigger=None, chunk: int = 8192) -> torch.Tensor:
    """Base-model predictions on stored inputs (optionally with the trigger added), in chunks."""
    xs = torch.as_tensor(x)
    out = []
    for i in range(0, len(xs), chunk):
        X = model_inputs(setup.dataset, xs[i : i + chunk], setup.dtype)
        if trigger is not None:
            X = trigger.apply(X)
        out.append(setup.model.predict(params.to(setup.dtype), X))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


EVAL_CACHE_BYTES = 512 * 1024**2


def eval_subset(n: int, points: int | None) -> np.ndarray | None:
    """The test points a subsampled evaluation uses: ``points`` evenly spaced indices of the n
    (a fixed choice, no randomness: every round and every run sees the same points); None for all."""
    if points is None or points >= n:
        return None
    return np.unique(np.linspace(0, n - 1, points).round().astype(np.int64))


def evaluation_inputs(setup: Setup, points: int | None = None) -> dict[str, Any]:
    """Test inputs for the per-round evaluation (all, or the :func:`eval_subset` of ``points``),
    as one model-ready float matrix [clean rows; triggered non-target rows] when it fits in 512 MiB."""
    ds = setup.dataset
    sub = eval_subset(len(ds.y_test), points)
    # the whole test set's entries at the top level (keys y, mask, rows, XX, X, Xb), a subset's under its own key
    c = setup.eval_inputs if sub is None else setup.eval_inputs.setdefault(f"subset-{len(sub)}", {})
    if "y" not in c:
        rows = np.arange(len(ds.y_test)) if sub is None else sub
        y = torch.from_numpy(ds.y_test[rows]).long()
        mask = backdoor_test_mask(y, setup.plan.target).numpy()
        nbytes = len(rows) * ds.x_test.shape[1] * torch.finfo(setup.dtype).bits // 8
        if 2 * nbytes <= EVAL_CACHE_BYTES:
            X = model_inputs(ds, ds.x_test[rows], setup.dtype)
            XX = torch.cat([X, setup.plan.trigger.apply(X[torch.from_numpy(mask)])])
            c.update(XX=XX, X=XX[: len(rows)], Xb=XX[len(rows) :])
        c.update(y=y, mask=mask, rows=rows)
    return c


def evaluate(setup: Setup, params: torch.Tensor, points: int | None = None) -> tuple[float, float]:
    """(clean test accuracy, backdoor accuracy = attack success on triggered non-target test points),
    on the whole test set or on the fixed subset of ``points`` of it (:func:`eval_subset`).

    With the inputs cached, both accuracies come from one product over the stacked clean and triggered
    inputs (the per-round evaluation is one GEMM)."""
    ds = setup.dataset
    c = evaluation_inputs(setup, points)
    y, mask = c["y"], c["mask"]
    m = len(y)
    if "XX" in c:
        pred = setup.model.predict(params.to(setup.dtype), c["XX"])
        clean_pred, bd_pred = pred[:m], pred[m:]
    else:
        x = ds.x_test[c["rows"]]
        clean_pred = predict(setup, params, x)
        bd_pred = predict(setup, params, x[mask], trigger=setup.plan.trigger) if mask.sum() else None
    clean = float((clean_pred == y).double().mean())
    if mask.sum() == 0:
        return clean, math.nan
    return clean, float((bd_pred == setup.plan.target).double().mean())


def resolved_config(setup: Setup) -> dict[str, Any]:
    d = setup.cfg.to_dict()
    ds = setup.dataset
    d["provenance"] = {
        "crfl_version": crfl.__version__,
        "torch_version": str(torch.__version__),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "dataset": {
            "name": ds.name,
            "train_samples": int(len(ds.y_train)),
            "test_samples": int(len(ds.y_test)),
            "num_features": ds.num_features,
            "num_classes": ds.num_classes,
            "source": {k: v for k, v in ds.source.items() if isinstance(v, (str, int, float, list, dict))},
        },
        "model": {"name": setup.model.name, "num_params": setup.model.num_params, "linear": setup.model.is_linear},
        "clients": {
            "num_clients": setup.data.num_clients,
            "samples": setup.data.sizes.tolist(),
            "tau": setup.tau.tolist(),
            "p": [float(v) for v in setup.weights],
        },
        "attack": {"rounds": list(setup.plan.rounds), "trigger_norm": setup.plan.trigger.norm},
    }
    from crfl import local
    from crfl.plugins import loaded

    if local.fused_linear_applies(setup.model):  # which engine trains the logistic model's local SGD here
        d["provenance"]["kernels"] = {"linear_sgd": local.linear_engine(setup.model, setup.data, setup.dtype)}
    if loaded():  # the user's modules that registered parts (crfl.plugins): certify and resume import them again
        d["provenance"]["plugins"] = loaded()
    return d

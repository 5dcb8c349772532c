"""The mixture reading: the law of the trained model over the server noise from the attack round on.

The paper's Theorems 2-3 read as written (docs/theory.md (h)): p_A, p_B are the smoothed class
probabilities of the *mixture* over training runs, conditioned on everything before the noise of
the attack round t_adv. They are bounded from K independent continuations of the run from the
attack round's pre-noise aggregate (:mod:`crfl.mixture`, simultaneous KL-Chernoff bounds at
confidence 1 - alpha), and the Gaussian mechanism at t_adv gives the budget

    Delta < sigma_{t_adv} (Phi^-1(p_A_lower) - Phi^-1(p_B_upper)) / 2,

turned into a radius on ||delta|| by model closeness, as in the coupled reading, whose budgets,
ingredients and assumption checks this reading shares (:mod:`crfl.readings.coupled`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from crfl import mixture, rundir
from crfl.bounds import BoundResult
from crfl.closeness import AttackTerm
from crfl.readings.coupled import CoupledReading
from crfl.rng import CertificationSeed, draw_certification_seed
from crfl.schedule import noise_after_round
from crfl.setup import Setup
from crfl.validation import ConfigError


class MixtureReading(CoupledReading):
    """The mixture over K continuations from the attack round; exact per-run class probabilities
    (linear models), Chernoff bounds over the runs, the Gaussian mechanism at sigma_{t_adv}."""

    name: ClassVar[str] = "mixture"
    GUARANTEE: ClassVar[str] = (
        "Averaged over the server noise from the attack round t_adv on (initial model, batches and earlier noise as in "
        "this run) and the smoothing noise, training on data without the trigger (D) predicts the same class at this "
        "input as the mixture of runs on D' does, whenever ||delta|| is below the radius; the mixture probabilities are "
        "bounded from K independent continuations, with confidence 1 - alpha per point."
    )
    CERTIFIES_BASE_MODEL: ClassVar[bool] = False
    REFERENCE: ClassVar[str] = "the law of continuations without the trigger from the attack round's aggregate"

    def __init__(self, setup: Setup, final: dict[str, Any], attack_log: list[dict[str, Any]], run_dir: Path) -> None:
        self._finals: dict[tuple[bool, int], torch.Tensor] = {}
        super().__init__(setup, final, attack_log, run_dir)

    def check_method(self, method: str) -> None:
        super().check_method(method)
        if method == "monte-carlo":
            raise ConfigError("The 'certify.method' parameter must be 'exact' or 'auto' for the mixture reading (per-run exact "
                              "probabilities of the linear model). Got 'monte-carlo' instead.")

    def noise(self, terms: tuple[AttackTerm, ...]) -> float:
        """The Gaussian noise of the Neyman-Pearson step: the server noise sigma_{t_adv} of the attack round."""
        if not terms:
            return float(self.setup.cfg.certify.sigma_T)
        return noise_after_round(self.setup.sigma, terms[0].round, self.setup.rounds, self.setup.cfg.certify.sigma_T)

    def own_checks(self) -> dict[str, dict[str, Any]]:
        replayable = rundir.open_run(self.run_dir).engine() == rundir.SIMULATOR
        return {
            "one_attack_round": {"holds": len(self.ing.terms) == 1,
                                 "detail": f"{len(self.ing.terms)} attack round(s); the mixture reading covers one"},
            "continuations_replay_the_run": {
                "holds": replayable,
                "detail": "the continuations train every client with the configured weights in every round after t_adv, as "
                          "the simulator did" if replayable else "a Flower run's later rounds had their own participation "
                          "(sampling, drops, rejected replies), which the continuations do not replay: use the coupled reading",
            },
        }

    @property
    def training_samples(self) -> int | None:
        return self.setup.cfg.certify.training_samples

    @property
    def has_twin(self) -> bool:
        return self.twin_params is not None and "twin_pre_noise" in self.state

    @property
    def statistical(self) -> bool:
        """The continuations are random draws (their noise from the certification seed)."""
        return True

    def _continuations(self, twin: bool, seed: CertificationSeed) -> torch.Tensor:
        """The K final models continuing the run (or its twin) from attack round t_adv, their noise from ``seed``.

        Trained anew for every seed: continuations whose votes were seen are never reused for other inputs
        (only the last set is kept, so a replayed seed on the same object does not retrain).
        """
        key_ = (twin, seed.seed)
        if key_ not in self._finals:
            # no terms when a radius blocker holds: the first attack round is then the kept aggregate's
            t_adv = self.ing.terms[0].round if self.ing.terms else int(self.state.get("round", -1))
            key = "twin_pre_noise" if twin else "pre_noise"
            if key not in self.state or int(self.state.get("round", -1)) != t_adv:
                raise ConfigError(
                    f"The run directory {str(self.run_dir)!r} keeps no pre-noise aggregate of attack round {t_adv} "
                    "(model_final.pt 'attack_state'): retrain it with this version of crfl for the mixture reading."
                )
            finals = mixture.continuations(self.setup, self.state[key], t_adv, self.setup.cfg.certify.training_samples,
                                           seed=seed)
            self._finals = {key_: finals}
        return self._finals[key_]

    def bounds(self, X: torch.Tensor, *, twin: bool = False, seed: CertificationSeed | None = None) -> BoundResult:
        """The mixture's c_A and (p_A_lower, p_B_upper) at X over K continuations of the run (or its twin).

        The continuations' noise comes from ``seed`` (None: a fresh one from the OS's entropy, drawn now,
        after X is fixed), so each call without a seed trains K fresh continuations (the cost of a
        certification, per call); the result's ``seed`` says which seed was used.
        """
        cz = self.setup.cfg.certify
        if twin and not self.has_twin:
            raise ConfigError(f"The run directory {str(self.run_dir)!r} has no twin: train it with --twin.")
        seed = draw_certification_seed() if seed is None else seed
        return mixture.mixture_certificate(self.setup, self._continuations(twin, seed), X, cz.sigma_T, cz.alpha, seed)

    def confidence(self) -> tuple[float | None, str | None, str | None]:
        return self.setup.cfg.certify.alpha, "kl-chernoff", "simultaneous"

    @property
    def twin_compared_with(self) -> str:
        return "mixture prediction of the twin's continuations"

    @property
    def twin_exact(self) -> bool:
        return False

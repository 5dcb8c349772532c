"""crfl: Certifiably Robust Federated Learning against backdoor attacks.

Implements Xie, Chen, Chen and Li, "CRFL: Certifiably Robust Federated Learning
against Backdoor Attacks", ICML 2021: training with server-side parameter
clipping and perturbation (Algorithm 1), parameter smoothing and certification
(Algorithm 2, Theorem 1, Corollary 1).
"""

__version__ = "0.2.0"

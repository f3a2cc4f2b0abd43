"""Robustness tools beyond training's PGD: AutoAttack, minimum-norm attacks, certified radii. No Ray, no MLflow."""

"""Evaluation: the metrics of `rjem eval` (a registry of metric objects, one threat model for the robustness ones),
FID/KID/IS and precision/recall, the reference classifiers, generation, the OOD suite, the gradient-masking report.
No Ray, no MLflow."""

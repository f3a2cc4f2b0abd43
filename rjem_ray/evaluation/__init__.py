"""Evaluation: the metrics, FID/KID/IS and precision/recall, generation, the OOD suite, the gradient-masking report, and `rjem eval`. No Ray, no MLflow."""

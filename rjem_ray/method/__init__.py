"""The method in pure PyTorch: energies, the Wide ResNet, PGD, SGLD/PYLD, the Gaussian-mixture prior, the replay buffer, checkpoints, the training step. No Ray, no MLflow."""

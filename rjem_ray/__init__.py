"""rjem-ray: Robust Joint Energy-Based Models trained, sampled and tuned on Ray.

``load_checkpoint(path)`` returns ``(model, config)``: the classifier (logits for NCHW input in [-1, 1],
in eval mode) and the typed configuration it was trained with.
"""

from ._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before anything can import torchvision (Ray workers import us first too)

__version__ = "0.1.0"


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint directory or file written by ``rjem train``: returns ``(model, config)``."""
    # lazy: this file runs first in every process that imports any rjem_ray module (Ray workers, `rjem`); restore
    # would bring the config and the module of every section into each of them
    from .method.restore import load_model

    return load_model(path, map_location=map_location)


__all__ = ["load_checkpoint", "__version__"]

"""The old home of ``load_model``, kept for MLflow models logged before the package's layers became folders.

A logged model is MLflow "model from code": its code file, stored with the run, says
``from rjem_ray.checkpoint import load_model``. Those runs stay loadable with ``mlflow.pyfunc.load_model``;
new models name ``rjem_ray.method.restore`` (``tracking/models.py``). Nothing in the package imports this.
"""

from .method.restore import load_model

__all__ = ["load_model"]

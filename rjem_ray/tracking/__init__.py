"""MLflow tracking: the only package that imports MLflow (tests/test_architecture.py checks it).

It may import ``rjem_ray.core``, ``rjem_ray.config`` and ``rjem_ray.method`` (it loads checkpoints), never Ray;
the Ray-free layers never import it. This file holds nothing: import each name from its module.

- ``stores.py``: the tracking, registry and artifact URIs made absolute (sqlite on a network file system refused),
  ``client_for`` (an ``MlflowClient`` on explicit stores, never MLflow's process-wide state), and the checks of a
  database or MLflow server (one line, password masked); importing any module here sets MLflow's defaults
  (no telemetry, no artifact progress bars)
- ``tracker.py``: ``Tracker``, one MLflow run (params, metrics, tags, artifacts, datasets with retry);
  ``tracker_for`` a config, ``runs_of`` an experiment, ``RUN_FILE`` (``OUT/mlflow_run.json``)
- ``models.py``: the run's model (an MLflow 3 LoggedModel, a pyfunc from code over the checkpoint), its
  registration, and ``resolve_checkpoint`` of ``models:/`` and ``runs:/`` URIs
- ``eval_runs.py``: ``rjem eval``'s own run, a child of the training run (``training_run_of``)
- ``server.py``: ``rjem server``'s ``mlflow server`` process (command and environment, start, wait, stop)
- ``migrate.py``: ``rjem migrate-store``, a sqlite store copied into a database server, ids kept
"""

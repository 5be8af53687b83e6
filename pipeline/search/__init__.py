"""The threshold and budget search (stage ``search@<method>``): Optuna studies of a method's search space.

- :mod:`pipeline.search.storage` — where studies live (journal file or PostgreSQL), seeded samplers, locked
  workers that end a study with exactly ``n_trials`` complete trials, the Pareto front and the selection rule.
- :mod:`pipeline.search.trials` — what one trial computes: the converted model with a sampled
  configuration, fine-tuned on a seeded subset and scored on the validation split.
- :mod:`pipeline.search.study` — one search from start to end: the study, its MLflow runs (one per study,
  one per trial), the trial tables, the chosen configuration's final model and its measurements.
"""

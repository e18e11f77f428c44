"""The command line's world: a run directory and its stages (teacher training, recording,
distillation, C-DEQ+, baselines, evaluation), their configuration, cost counting, reports,
summaries and seeds.

Examples:
    >>> from cdeq.run import Run, build_config                     # doctest: +SKIP
    >>> run = Run("runs/digits", build_config("digits", quick=True))  # doctest: +SKIP
    >>> report = run.run_all()                                       # doctest: +SKIP
"""

"""Performance measurement: the throughput bench, FLOP counts and device peaks, the plain
baselines, the prepared GPU check and the docs tables it feeds, the projection printed before a
long run, and the two pieces the pipeline reads at run time (the study loop's phase timer in
:mod:`~clip_xai.perf.timing`, the ``precision=auto`` table in :mod:`~clip_xai.perf.precision_table`).

Commands: ``python -m clip_xai.perf.bench`` (``make bench``, ``clip-xai-bench``),
``python -m clip_xai.perf.gpu_check`` (``make gpu-check``), ``python -m clip_xai.perf.tables``.
Nothing is imported here, so ``import clip_xai.perf.timing`` stays cheap.
"""

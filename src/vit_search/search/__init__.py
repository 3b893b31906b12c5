"""Architecture and hyperparameter search: the space (``space``), where studies live (``storage``),
the worker loop (``study``), one worker's run with MLflow logging (``run``) and the study's report
(``report``)."""

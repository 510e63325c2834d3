"""pneumomap: chest radiographs -> pneumonia likelihoods and pixel-level opacity maps.

Subpackages: ``stages`` (image I/O, preprocessing, the networks), ``train`` (per-stage
training), ``infer`` (the pipeline DAG, runner, writers, tuning). ``stages`` knows nothing of
``train`` or ``infer``; ``train`` and ``infer`` never import each other.
"""

__version__ = "0.1.0"

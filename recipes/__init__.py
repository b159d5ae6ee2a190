"""Recipes: LightningModules, data and variant tables that show unstable gradients and their remedies.

Three recipes, each a model plus a table of named variants (the pathology and each remedy), built only
from ``stability_callbacks`` callbacks and model flags:

- ``deep_mlp``: a 30-layer sigmoid MLP whose gradients vanish, and 16 variants that change one thing;
- ``resnet``: a plain deep CNN against its residual twin (He et al. 2016), InitSwap and a
  normalisation-free net with AGC;
- ``lstm``: a vanilla RNN whose gradients vanish or explode on the adding problem, the LSTM, the GRU and
  three gradient clippers.

``corrupted`` feeds one bad batch to a healthy run, with and without ``StabilityAutopilot``.

Modules: ``spec`` (the shared types: variant, preset, recipe, run results), ``base`` (the models'
LightningModule base), ``data``, the recipe modules above, ``registry`` (the recipes by name), ``train``
(one run), ``runner`` (compare, demo, depth table), ``reports`` (tables, summary files, event files) and
``cli`` (the command line, run by ``python -m recipes``).

Run ``python -m recipes demo`` then ``tensorboard --logdir logs``; ``python -m recipes --help`` for more.
"""

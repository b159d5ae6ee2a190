"""Recipes: LightningModules, data and variant tables that show unstable gradients and their remedies.

Three recipes, each a model plus a table of named variants (the pathology and each remedy), built only
from ``stability_callbacks`` callbacks and model flags:

- ``deep_mlp``: a 30-layer sigmoid MLP whose gradients vanish, and 15 remedies;
- ``resnet``: a plain deep CNN against its residual twin (He et al. 2016), InitSwap and a
  normalisation-free net with AGC;
- ``lstm``: a vanilla RNN whose gradients vanish or explode on the adding problem, the LSTM, the GRU and
  three gradient clippers.

Run ``python -m recipes demo`` then ``tensorboard --logdir logs``; ``python -m recipes --help`` for more.
"""

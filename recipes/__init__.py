"""Recipes: LightningModules, data and variant tables that show unstable gradients and their remedies.

Four recipes, each a model plus a table of named variants (the pathologies and the remedies, each
remedy naming the pathology it cures), built only from ``stability_callbacks`` callbacks and model flags:

- ``deep_mlp``: deep sigmoid and tanh MLPs whose gradients vanish, and variants that change one thing;
- ``resnet``: a plain deep CNN against its residual twin (He et al. 2016), InitSwap and a
  normalisation-free net with AGC;
- ``lstm``: a vanilla RNN whose gradients vanish or explode on the adding problem, the LSTM, the GRU and
  the gradient clippers on an exploding RNN;
- ``transformer``: a small byte-level decoder-only language model (pre-/post-LN, QK-norm) at a high
  learning rate, with warm-up, ZClip and the autopilot.

``corrupted`` feeds one bad batch to a healthy run, with and without ``StabilityAutopilot``.

Modules: ``spec`` (the shared types: variant, preset, recipe, run results), ``base`` (the models'
LightningModule base), ``data``, the recipe modules above, ``registry`` (the recipes by name), ``train``
(one run), ``runner`` (compare, demo, depth table), ``reports`` (tables, summary files, event files) and
``cli`` (the command line, run by ``python -m recipes``).

Run ``python -m recipes demo`` then ``tensorboard --logdir logs``; ``python -m recipes --help`` for more.
"""

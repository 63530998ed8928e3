"""Every picture repsim makes, in one package.

- :mod:`.runner`: ``repsim figures``, the spec runner (``build_all``, the kind table ``KINDS``,
  ``figure_kind``, caching by content).
- :mod:`.draw`: all matplotlib drawing (CKA heatmaps and curves, maps over images, files).
- :mod:`.study`: the study's CKA figure kinds and accuracy table.
- :mod:`.attention`: ViT attention pictures, ``repsim attention`` and the kind ``attention``.
- :mod:`.featuremaps`: CNN feature maps, ``repsim featuremaps`` and the kind ``featuremaps``.

Imports run one way: the runner names the kinds by module path and imports them only when
a spec uses them; the kinds import :mod:`.draw`, never the runner. This file imports nothing,
so ``repsim.figures.draw`` (used by ``repsim cka`` for its heatmap) loads no runner.
"""

"""Every picture repsim makes: :mod:`.runner` (``repsim figures``), :mod:`.draw` (matplotlib),
and one module per figure kind.

Imports run one way: the runner imports a kind's module only when a spec uses it; kinds never
import the runner. This file imports nothing, so ``repsim cka`` loads :mod:`.draw` alone.
"""

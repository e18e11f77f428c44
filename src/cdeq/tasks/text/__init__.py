"""Language modelling with a DEQ-Transformer: tasks ``shakespeare`` and ``text``.

- :mod:`.data`: the corpus (a file cut in three, a WikiText-layout folder, or token files), its
  vocabulary and fixed windows.
- :mod:`.tokens`: text prepared once into memory-mapped token files; folders of token ids.
- :mod:`.model`: the injection, the weight-tied causal transformer block and the head.
- :mod:`.task`: the :class:`~cdeq.tasks.base.Task` subclasses and their configuration.
- :mod:`.generate`: sampling text from a teacher or a student.
- :mod:`.presets`: the quick task preset and the run defaults, as data.
"""

from .data import EOS, SPLITS, UNK, Corpus, find_shakespeare, load_corpus, window_starts, windows
from .generate import Generation, generate
from .model import CausalTransformerCell, LMHead, TextInjection
from .task import ShakespeareConfig, ShakespeareTask, TextConfig, TextTask

__all__ = [
    "EOS",
    "SPLITS",
    "UNK",
    "CausalTransformerCell",
    "Corpus",
    "Generation",
    "LMHead",
    "ShakespeareConfig",
    "ShakespeareTask",
    "TextConfig",
    "TextInjection",
    "TextTask",
    "find_shakespeare",
    "generate",
    "load_corpus",
    "window_starts",
    "windows",
]

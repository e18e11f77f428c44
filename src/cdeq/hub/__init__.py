"""Using a distilled model: the :class:`Pipeline` (student and plans, callable, saved and loaded),
export to a standalone one-step model, compiled plans, and the module recipes that saving uses.

Examples:
    >>> pipe = cdeq.hub.Pipeline(student).select_plans(val_batches, loss=F.cross_entropy)  # doctest: +SKIP
    >>> pipe.save_pretrained("my-cdeq")                                                  # doctest: +SKIP
"""

from .export import ExportedStudent, OneStepStudent, export_one_step, load_exported
from .pipeline import Pipeline, from_pretrained, load_student, save_pretrained

__all__ = ["ExportedStudent", "OneStepStudent", "Pipeline", "export_one_step", "from_pretrained",
           "load_exported", "load_student", "save_pretrained"]

"""The label convention shared by the data side, the losses and the metrics.

Landmark images carry a class index in ``[0, num_classes)``; the mapping between dataset
landmark ids and class indices is :class:`datamodules.manifest.ClassMap`. Non-landmark images
(the Places-style pool) all carry one reserved label, :data:`NONLANDMARK`, which is never a valid
class index, so no loss can mistake it for a landmark by accident.
"""

NONLANDMARK: int = -1

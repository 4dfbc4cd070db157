"""Hosting: the models a process serves and the operations on them, split by concern.

:class:`Engine` is the facade the HTTP routes call (one method per operation); see
``service/hosting/engine.py`` for the map of the modules behind it and ``docs/architecture.md``
for the life of one ``/update``.
"""

from service.hosting.engine import Engine
from service.hosting.hosted import Hosted, Published
from service.hosting.stats import EngineStats, ModelStats

__all__ = ["Engine", "EngineStats", "Hosted", "ModelStats", "Published"]

"""NVFlare job definitions. Each algorithm is one module, as NVFlare keeps its recipes
(``jobs/<name>.py``, listed in ``base.ALGORITHM_MODULES``; ``base.algorithms()`` gives them by name).
Beside them: what they share (``base``: the algorithm interface, the job description and the recipe
assembly; ``addons``: privacy filter, contribution weights, site groups, tracking, resume, quantized
exchange; ``resume``: the resume point of a stopped study; ``resilient_recipes``: the resilient round
on NVFlare's recipes), the statistics job (``stats``) and the exported job folders (``jobs/<name>/``)
that ``nvflare job submit -j`` takes (``catalog``)."""

"""NVFlare job definitions, one module per algorithm as NVFlare keeps its recipes (``fedavg``,
``fedprox``, ``fedopt``, ``fedper``, ``fedavg_he``), what they share (``base``: the job description
and the recipe assembly; ``addons``: privacy filter, contribution weights, site groups, tracking,
resume; ``resilient_recipes``: the resilient round on NVFlare's recipes) and the exported job
folders (``jobs/<name>/``) that ``nvflare job submit -j`` takes (``catalog``)."""

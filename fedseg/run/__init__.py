"""Where a job runs and what it leaves: NVFlare's simulator (``simulate``), a POC deployment on this
machine (``poc``, ``deployment``), the run folder's results (``results``) and resume points (``resume``)."""

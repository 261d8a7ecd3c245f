"""NVFlare job definitions (built with NVFlare's recipes) and the exported job folders
(``jobs/<name>/``) that ``nvflare job submit -j`` takes, plus how a job is run in each environment."""

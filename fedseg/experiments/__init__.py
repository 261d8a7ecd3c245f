"""Experiments over jobs: ``compare`` (centralized vs local vs federated methods on the same sites and
budget) and ``seed_sweep`` (the same comparison over several seeds, paired by seed)."""

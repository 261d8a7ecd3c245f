"""Consortium description -> NVFlare project.yml -> per-hospital startup kits (issue 6)."""

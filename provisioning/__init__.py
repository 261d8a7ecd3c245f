"""From a consortium description to a running study across hospitals (NVFlare provisioning).

- ``consortium``: the YAML a project lead edits (server, hospitals, admins), validated, and its
  mapping to NVFlare's ``project.yml``;
- ``kits``: ``nvflare provision`` into owner-only startup kits, adding a hospital later with the
  same root CA, and each hospital's ``SITE_GUIDE.md``;
- ``deployment``: a provisioned consortium's kits run as local processes (trials, tests).

The command line is ``fedseg provision`` (fedseg/cli/provision.py); an example description is
``provisioning/consortium.example.yml``.
"""

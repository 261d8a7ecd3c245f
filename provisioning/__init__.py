"""From a consortium description to a running study across hospitals (NVFlare provisioning).

- ``consortium``: the YAML a project lead edits (server, hospitals, admins), validated, and its
  mapping to NVFlare's ``project.yml``;
- ``kits``: ``nvflare provision`` into owner-only startup kits, adding a hospital later with the
  same root CA, and each hospital's ``SITE_GUIDE.md`` (POC and labs: every key made in one place);
- ``distributed``: a real study's path, where each hospital makes its own key and assembles its
  kit from the lead's signature (``nvflare cert request/approve``, ``nvflare package``);
- ``storage_guard``: the server kit's start refuses job storage that other accounts can read;
- ``site_control``: what a kit lets a job do (no custom code, the class allow lists, the GPUs);
- ``nvflare_cli``: the ``nvflare`` command of this environment, which provisioning and the local
  deployments run.

A provisioned consortium's kits run as local processes (trials, tests) with
``fedseg.run.kit_deployment``: a runner, above provisioning.

The command line is ``fedseg provision`` (fedseg/cli/provision.py); an example description is
``provisioning/consortium.example.yml``.
"""

"""fedseg: federated 3D brain-tumour segmentation (NVFlare + PyTorch Lightning + MONAI).

The repository folders map onto this namespace: ``lightning_modules/`` is
``fedseg.lightning_modules``, ``app/`` is ``fedseg.app``, ``jobs/`` is ``fedseg.jobs`` and
``provisioning/`` is ``fedseg.provisioning``.
"""

__version__ = "0.1.0"

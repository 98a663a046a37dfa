"""The ``diffusers`` backend (PyTorch): ``capture`` runs diffusers' own SDXL pipeline for one side of a
comparison; ``view`` is the in-process numpy view the tests use (:class:`.view.TorchBackend`)."""

"""One side of a comparison (PyTorch/diffusers or MindSpore) run on its own, as a *capture*.

A side gets a :class:`~.request.SideRequest` (the exact inputs), loads its model one
component at a time (text encoders, then UNet, then VAE; each freed before the next, so a
full-size SDXL fits next to nothing else), records activations, optionally denoises an
image, and returns a :class:`~.request.SideResult`.  :func:`~.run.run_side` runs it in a
child process by default, so the two frameworks never hold their models at the same time
and each side's peak memory is its own.
"""

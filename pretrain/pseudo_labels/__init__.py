"""CLIPTeX (paper 003) pseudo-labels: experts that label images with dense targets.

``torch_client.TorchExperts``: the PyTorch experts (Mask R-CNN, DPT, NLL-AngMF) run in the torch
environment by ``torch_experts/server.py`` (a folder of torch-only scripts, not a package).
"""

"""CLIPTeX's experts (paper 003): models that predict dense pseudo-labels for an image-text set.

An expert has ``targets`` (the dense targets it predicts, among ``segmentation``, ``depth``,
``normals``) and ``predict(images) -> [{target: array}]``: one dict per uint8 (H, W, 3) image,
each array at that image's size in the conventions of :mod:`pretrain.data.dense` (class ids with
255 = no label; depth > 0, 0 = invalid; unit normals in the camera frame, zero = invalid).

* :mod:`~pretrain.pseudo_labels.experts`: the protocol, the JAX experts (dense probe / fine-tune
  runs of this project) and the experts a config names;
* :mod:`~pretrain.pseudo_labels.members`: predictions -> the label members of a shard sample;
* ``torch_client`` / ``torch_experts/``: PyTorch experts (Mask R-CNN, DPT, NLL-AngMF) served from
  the separate torch environment.

``python -m pretrain.pseudo_label`` runs them over a data set (pretrain/pseudo_label.py).
"""

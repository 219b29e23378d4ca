"""The fields of a record (what a source's ``[i]`` returns) that are read by name across modules.

Every record has an image and captions (see ``pretrain.data.pipeline``); a record may also carry its
stored reinforcements: what DataCompDR-style shards keep beside each sample for reinforced
training. Sources add these fields when they have them; reinforced training reads them.
"""

from __future__ import annotations

SYNTHETIC_CAPTIONS = "synthetic_captions"  # captioner-written captions: list of str
TEACHER_IMAGE_EMBEDDINGS = "teacher_image_embeddings"  # (A, D): of A stored views of the image
TEACHER_TEXT_EMBEDDINGS = "teacher_text_embeddings"  # (T, D): real, then synthetic, captions
AUGMENTATION_BOXES = "augmentation_boxes"  # (A, 4): each stored view's crop (top, left, h, w)
MALFORMED_REINFORCEMENT = "malformed_reinforcement"  # why the reinforcements could not be read

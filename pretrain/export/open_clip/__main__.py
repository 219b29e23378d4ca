"""``python -m pretrain.export.open_clip``: see cli.py."""

from pretrain.export.open_clip.cli import main

main()

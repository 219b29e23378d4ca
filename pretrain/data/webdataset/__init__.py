"""Webdataset / DataComp tar shards: random-access reading (``WebDatasetSource``) and writing.

The modules, in the order a sample is found: ``shards`` (which files), ``tar`` (the header scan),
``shard_index`` (one shard's samples), ``combined_index`` (all shards, memory-mapped),
``handles`` (open files), ``datacompdr`` (the reinforcement members), ``source`` (records),
``writer`` (making shards).
"""

from pretrain.data.webdataset.source import WebDatasetSource
from pretrain.data.webdataset.writer import write_shards

__all__ = ["WebDatasetSource", "write_shards"]

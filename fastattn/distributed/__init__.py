"""Sequence-parallel sliding-window attention over torch.distributed (context parallelism).

Each rank holds a contiguous shard of one sequence; a sliding window needs only the keys
within ``left`` before and ``right`` after the shard (its halos), so no ring over every rank
is needed. See docs/distributed.md for the design and its cost model.
"""

from fastattn.distributed._api import local_attention

__all__ = ["local_attention"]

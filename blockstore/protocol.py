"""The block-store protocols: what a :class:`Disk` needs from storage, and the richer
interface it uses when a store offers it (extents written without their blocks' old
content, reads answered as layers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

BlockValue = bytes | None
"""Block data; ``b""`` reads as zeros; ``None`` means not held (fall through to the base)."""

Extent = tuple[int, bytes | int]
"""Part of a block: (start, its bytes) or (start, a number of zero bytes)."""


@runtime_checkable
class BlockStore(Protocol):
    """What a disk needs from storage. Calls for the same block never overlap."""

    block_size: int

    async def list_blocks(self) -> dict[int, bool]:
        """Blocks held: True if they hold data, False if they read as zeros."""
        ...

    async def read_blocks(self, blocks: Sequence[int]) -> dict[int, BlockValue]: ...

    async def write_blocks(self, blocks: Mapping[int, BlockValue]) -> None: ...

    async def flush(self) -> None:
        """Return only when every write before it is durable."""
        ...


@dataclass(frozen=True)
class Layered:
    """A block held as extents (oldest first) over a content the store does not hold:
    the base image's (``read_layers`` merges extents over anything else itself)."""

    extents: tuple[tuple[int, bytes], ...]


@runtime_checkable
class ExtentBlockStore(BlockStore, Protocol):
    """A block store that also takes parts of blocks (what :class:`Disk` uses if offered)."""

    async def write_extents(self, extents: Mapping[int, Sequence[Extent]]) -> None:
        """Lay extents over blocks (later ones over earlier), their other bytes unchanged."""
        ...

    async def read_layers(self, blocks: Sequence[int]) -> dict[int, BlockValue | Layered]:
        """Like ``read_blocks``, with :class:`Layered` for extents over the base image."""
        ...

    async def block_states(self, first: int, count: int) -> bytes:
        """Per block from ``first``: 0 not held, 1 data, 2 reads as zeros."""
        ...


BaseReader = Callable[[list[int]], Awaitable[dict[int, bytes]]]
"""The base image's content of blocks (what a fold needs under extents not over data)."""

"""The prefix cache: full KV pages indexed by their content, shared by requests, evicted LRU.

A radix tree whose edges are whole pages. A node stands for one full page of KV and is reached
from the root by the exact content of every page before it and of its own, so a match is a
prefix of a prompt, never a hash that may collide. A page's content (`PageKey`) is its token ids
and, for the positions an image fills, that image's cache key (the MD5 of its bytes together with
every preprocessing setting that changes its rows: `ImageRef.md5`) and where in the image the
page starts: two prompts with the same text and different images share no page, and a chat that
sends its image again shares all of it.

Ownership, the contract the scheduler keeps (`check_integrity` checks it):
- a page is free in the `PageAllocator`, private to one request, or held by exactly one node;
- a request holds a path of nodes from the root (its first pages); each node's `ref_count` is
  the number of requests holding it, so a node holds at least as many as any child;
- nodes nobody holds stay cached and are evicted least recently used first, leaves before
  their parents, only when the allocator runs out of free pages.

Pure Python, no torch, no asyncio: the scheduler owns one and tests drive it directly.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable

import msgspec

from vlmd.core.page_allocator import PageAllocator

# (token ids of the page, ((image key, offset in the image, position in the page), ...) for the
# images it overlaps)
PageKey = tuple[tuple[int, ...], tuple[tuple[str, int, int], ...]]


class Node(msgspec.Struct, eq=False, gc=False):
    """One cached page: `page` holds the KV of the positions its key names.

    A cache may hold hundreds of thousands of nodes, and a pass of the garbage collector over
    objects it tracks costs time in proportion to their number, the GIL held (the scheduler's
    loop, and the next plan, wait it out): nodes are not tracked (gc=False). A node and its
    parent refer to each other, a cycle the collector would never free, so the cache breaks it
    when it evicts the node, and breaks them all when it is dropped itself."""

    page: int
    key: PageKey | None  # None for the root
    parent: Node | None
    children: dict[PageKey, Node] = msgspec.field(default_factory=dict)
    ref_count: int = 0
    last_used: int = 0  # the cache's clock when a request last took or left it

    def __repr__(self) -> str:  # not the fields: parent and children lead back to it
        return f"Node(page={self.page}, ref_count={self.ref_count}, children={len(self.children)})"


class PrefixCache:
    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.root = Node(page=-1, key=None, parent=None)
        self.num_nodes = 0
        self.num_unreferenced = 0  # nodes no request holds: every one of them can be evicted
        self.num_evicted = 0  # pages evicted so far (for /metrics)
        self._clock = itertools.count(1)
        # (last_used, tie, node) of unreferenced leaves; stale entries are skipped when popped.
        self._leaves: list[tuple[int, int, Node]] = []
        self._tie = itertools.count()

    def __del__(self) -> None:
        for node in self.nodes():  # the tree's cycles, which the garbage collector cannot see
            node.parent = None

    # --- lookups and references ---------------------------------------------------------------

    def match(self, keys: Iterable[PageKey]) -> list[Node]:
        """The longest path from the root whose pages have these contents, in order."""
        path: list[Node] = []
        node = self.root
        for key in keys:
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    def acquire(self, path: list[Node]) -> None:
        """A request starts holding these nodes (a path from the root)."""
        now = next(self._clock)
        for node in path:
            if node.ref_count == 0:
                self.num_unreferenced -= 1
            node.ref_count += 1
            node.last_used = now

    def release(self, path: list[Node]) -> None:
        """A request stops holding these nodes; those nobody holds become evictable."""
        now = next(self._clock)
        for node in reversed(path):
            assert node.ref_count > 0, "a node released more often than acquired"
            node.ref_count -= 1
            node.last_used = now
            if node.ref_count == 0:
                self.num_unreferenced += 1
                if not node.children:
                    self._push_leaf(node)

    def insert(self, parent: Node, key: PageKey, page: int) -> Node:
        """Cache `page` (full, its KV computed) as the child of `parent` with content `key`, held by
        the request that computed it (ref_count 1); the page now belongs to the cache. If that
        content is cached already, the existing node is returned, held, and `page` stays the
        caller's (same KV, another page)."""
        assert parent is self.root or parent.ref_count > 0, "insert under a node the caller holds"
        node = parent.children.get(key)
        if node is None:
            node = Node(page, key, parent)
            parent.children[key] = node
            self.num_nodes += 1
            self.num_unreferenced += 1  # acquire below counts it back
        self.acquire([node])
        return node

    # --- eviction ------------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` unreferenced pages into the allocator, least recently used
        leaves first; returns how many were freed."""
        freed = 0
        while freed < num_pages and self._leaves:
            last_used, _, node = heapq.heappop(self._leaves)
            if node.ref_count or node.children or node.last_used != last_used or node.parent is None:
                continue  # taken again, grown children, touched since, or evicted already
            parent = node.parent
            del parent.children[node.key]
            node.parent = None
            self.allocator.free([node.page])
            self.num_nodes -= 1
            self.num_unreferenced -= 1
            self.num_evicted += 1
            freed += 1
            if parent is not self.root and parent.ref_count == 0 and not parent.children:
                self._push_leaf(parent)
        return freed

    def allocate(self, count: int) -> list[int]:
        """`count` pages from the allocator, evicting cached ones when it has too few."""
        shortfall = count - self.allocator.num_free
        if shortfall > 0:
            self.evict(shortfall)
        return self.allocator.allocate(count)

    @property
    def num_available(self) -> int:
        """Pages an allocation can get: free ones and evictable cached ones."""
        return self.allocator.num_free + self.num_unreferenced

    def _push_leaf(self, node: Node) -> None:
        heapq.heappush(self._leaves, (node.last_used, next(self._tie), node))
        if len(self._leaves) > 4 * self.num_nodes + 64:  # mostly stale entries: rebuild
            self._leaves = [
                (n.last_used, next(self._tie), n) for n in self.nodes() if n.ref_count == 0 and not n.children
            ]
            heapq.heapify(self._leaves)

    # --- checks ---------------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def check_integrity(self, holders: Iterable[list[Node]]) -> set[int]:
        """Check the tree against the paths requests hold; returns the cached pages."""
        nodes = self.nodes()
        assert len(nodes) == self.num_nodes, "node count drifted"
        refs: dict[int, int] = {}
        for path in holders:
            parent = self.root
            for node in path:
                assert node.parent is parent, "a request holds nodes that are not a path from the root"
                refs[id(node)] = refs.get(id(node), 0) + 1
                parent = node
        for node in nodes:
            assert node.ref_count == refs.get(id(node), 0), "a node's ref_count is not its holders"
            assert node.parent.children[node.key] is node, "a node is not its parent's child"
            assert node.parent is self.root or node.parent.ref_count >= node.ref_count
        assert sum(node.ref_count == 0 for node in nodes) == self.num_unreferenced, "unreferenced drifted"
        leaves = {id(node) for _, _, node in self._leaves}
        for node in nodes:
            if node.ref_count == 0 and not node.children:
                assert id(node) in leaves, "an evictable leaf the heap does not know"
        pages = [node.page for node in nodes]
        assert len(pages) == len(set(pages)), "a page held by two nodes"
        return set(pages)

"""Pure policy: no torch, no asyncio. Unit-testable in microseconds."""

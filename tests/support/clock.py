class Clock:
    """A settable clock in microseconds, handed to a store instead of Redis' TIME."""

    def __init__(self, now_us: int = 1_800_000_000_000_000):
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += int(seconds * 1_000_000)

"""A clock the test moves by hand, for plain classes that take a `clock` callable (learner/driver/recovery.py Crashes,
motionnft_core/telemetry.py Busy)."""


class Clock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

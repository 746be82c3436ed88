"""User-facing errors: every one names the problem and the fix, on one line each."""


class ClipXaiError(Exception):
    """A bad input or environment problem that the user can fix.

    The message always has two parts: what is wrong, and what to do about it. The CLI prints it
    without a traceback and exits with status 2.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}")

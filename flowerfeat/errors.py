"""FlowerfeatError: what the user did wrong, said in one line with the fix."""


class FlowerfeatError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""

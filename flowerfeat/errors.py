"""FlowerfeatError: what the user did wrong, said in one line with the fix."""


class FlowerfeatError(Exception):
    """A problem with the user's input or environment, said in one line with the path and the fix; the CLI prints
    it as ``error: ...`` and exits 2.

    Example::

        try:
            flowerfeat.extract("no/such/folder")
        except flowerfeat.FlowerfeatError as e:
            print(e)  # no/such/folder: data folder not found; run `flowerfeat download` or pass --data DIR ...
    """

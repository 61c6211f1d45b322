class OpsError(Exception):
    """A problem the operator can fix (unreachable broker, unknown group, bad time or REF).
    The CLI prints it as one line and exits non-zero; it never carries a traceback."""

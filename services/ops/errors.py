class OpsError(Exception):
    """A problem the operator can fix (unreachable broker, unknown group, bad time or REF).
    The CLI prints it as one line and exits non-zero; it never carries a traceback."""


def database_problem(exc: BaseException, limit: int = 150) -> str:
    """A database error in one line an operator can read: the driver's message (SQLAlchemy wraps
    it with the statement), whitespace folded, at most `limit` characters."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:limit]

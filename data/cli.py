"""How the data commands end: one line on stderr and a non-zero status, a traceback only with DEBUG=1."""

import os
import sys

from data.stream import DataError


def run(main) -> None:
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command to resume")
    except Exception as e:
        if os.environ.get("DEBUG") == "1":
            raise
        detail = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e} (DEBUG=1 shows the traceback)"
        sys.exit(f"error: {detail}")

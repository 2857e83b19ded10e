"""Entry point of the `wgcni` binary: the CNI plugin when CNI_COMMAND is set, the operator CLI otherwise.

The CNI path imports only the standard library (enforced by tests/unit/test_layering.py); click is loaded only
for the CLI.
"""

import io
import os
import sys


def main() -> None:
    if "CNI_COMMAND" in os.environ:
        from cni_plugin.cni import dispatch

        stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
        stdout = sys.stdout if sys.stdout is not None else io.StringIO()
        sys.exit(dispatch(os.environ, stdin, stdout))
    from cni_plugin.cli import run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()

"""Entry point of the `wgcni` binary: the CNI plugin when CNI_COMMAND is set, the operator CLI otherwise.

The CNI path imports only the standard library (enforced by tests/unit/test_layering.py); click is loaded only
for the CLI. The CNI path is one short process on kubelet's pod start: it runs without the cyclic garbage
collector (reference counting frees what it makes; a collection only scans the modules it imported) and ends
with `_exit` once stdout is flushed, skipping the interpreter's teardown, whose final collection and
deallocation of every module is work nobody waits for. It uses `posix`, the C module `os` wraps, never `os` itself,
whose import costs more than a millisecond of each ADD and DEL (docs/benchmarks.md, P1). In the bundle,
packaging/launcher.c imports this module and calls `main()`.
"""

import gc
import io
import posix
import sys


def main() -> None:
    if b"CNI_COMMAND" in posix.environ:
        gc.disable()
        from cni_plugin.cni import dispatch

        stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
        stdout = sys.stdout if sys.stdout is not None else io.StringIO()
        code = dispatch(environment(), stdin, stdout)
        try:
            stdout.flush()
            if sys.stderr is not None:
                sys.stderr.flush()
        except OSError:
            code = code or 1  # the runtime did not get the result: not a success
        posix._exit(code)
    from cni_plugin.cli import run

    sys.exit(run(sys.argv[1:]))


def environment() -> dict[str, str]:
    """The process environment decoded as ``os.environ`` decodes it (the filesystem encoding, surrogateescape)."""
    encoding = sys.getfilesystemencoding()
    return {key.decode(encoding, "surrogateescape"): value.decode(encoding, "surrogateescape")
            for key, value in posix.environ.items()}


if __name__ == "__main__":
    main()

"""``tcjepa train ...`` whose checkpoint writes are held up for a minute, so that a test can send
a second signal while the stop's checkpoint is being written (tests/test_resume.py)."""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    import tcjepa.train as loop
    from tcjepa.cli import main as cli

    real = loop.save_checkpoint

    def slow(*args, **kwargs):
        os.write(2, b"checkpoint held up\n")
        time.sleep(60)
        return real(*args, **kwargs)

    loop.save_checkpoint = slow
    return cli(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m service`` is ``postserve``."""

from service.cli import app

if __name__ == "__main__":
    app(prog_name="postserve")

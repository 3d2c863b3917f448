"""README.md stays true: every flag documented, the set-up commands present."""
from __future__ import annotations

from pathlib import Path

import main_clip

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_flag_is_documented():
    for action in main_clip.get_args_parser()._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"`{option}`" in README, option


def test_setup_commands_are_there():
    assert "pip install -r requirements.txt && python main_clip.py --demo" in README
    assert "python -m pytest tests" in README

"""settings.ini and its schema."""
import configparser
from pathlib import Path

from qaclims.settings import SCHEMA, load_settings, render_settings

REPO = Path(__file__).resolve().parents[1]


def test_repository_settings_is_the_rendered_schema():
    assert (REPO / "settings.ini").read_text() == render_settings()


def test_every_key_has_a_comment_and_a_valid_default():
    lines = (REPO / "settings.ini").read_text().splitlines()
    for setting in SCHEMA:
        index = next(i for i, line in enumerate(lines) if line.split("=")[0].strip() == setting.key)
        assert lines[index - 1].startswith("# "), f"{setting.name} has no comment line"
    settings = load_settings(REPO / "settings.ini")
    assert settings.study.profile == "synth"


def test_round_trip_through_render(tmp_path):
    settings = load_settings(REPO / "settings.ini", {"study.seeds": "3 4", "models.clip_model": "ViT-B-16"})
    path = tmp_path / "settings.ini"
    path.write_text(render_settings(settings))
    again = load_settings(path)
    assert again.as_dict() == settings.as_dict()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    assert parser["study"]["seeds"] == "3 4"

"""The docs that are generated from the code match it."""

from __future__ import annotations

from medidiff import config_docs, names
from medidiff.config import Config


def test_configuration_doc_matches_schema():
    committed = config_docs.DOC_PATH.read_text()
    assert committed == config_docs.render(), (
        f"docs/configuration.md is out of date with medidiff/config.py: run `{config_docs.COMMAND}`"
    )


def test_configuration_doc_lists_every_key_with_a_description():
    text = config_docs.render()
    for section, field in Config.model_fields.items():
        if not config_docs._is_section(field):
            assert f"| `{section}` |" in text
            assert field.description, f"{section} has no Field(description=...)"
            continue
        for key, sub in field.annotation.model_fields.items():
            assert f"| `{section}.{key}` |" in text
            assert sub.description, f"{section}.{key} has no Field(description=...)"
    assert "`anomaly.seed`" in text
    assert ", ".join(f"`{name}`" for name in names.SAMPLERS) in text
    assert "0 < x < 1" in text  # anomaly.target_fpr: Field(gt=0, lt=1)


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n")
    assert config_docs.main([str(stale), "--check"]) == 1
    assert config_docs.COMMAND in capsys.readouterr().err
    assert config_docs.main([str(stale)]) == 0
    assert config_docs.main([str(stale), "--check"]) == 0

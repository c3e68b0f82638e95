"""Building the tiny judge (in the judge actor, whose output reaches the job's console) prints no progress bar."""

from __future__ import annotations

from transformers.utils import logging as hf_logging

from motionnft_core.models.tiny_judge import build_tiny_judge


def test_building_the_tiny_judge_writes_no_progress_bar(tmp_path, capfd):
    hf_logging.enable_progress_bar()  # as in a fresh actor process
    path = build_tiny_judge(tmp_path / "judge")
    out, err = capfd.readouterr()
    assert (path / "model.safetensors").is_file()
    assert "Writing model shards" not in out + err, err[-2000:]
    assert hf_logging.is_progress_bar_enabled()  # the rest of the process keeps its bars

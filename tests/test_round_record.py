"""scripts/round_record.py: the record built from `device_round.sh setting` archives keeps the
metrics, drops the answers, pairs the benign change task by task and keeps a cut run visible."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any


def _eval(correct: list[bool], triggered: float) -> dict[str, Any]:
    return {
        "asr": {"untriggered": 0.0, "triggered": triggered},
        "benign_accuracy": sum(correct) / len(correct),
        "n": {"harmful": 10, "benign": len(correct)},
        "benign_correct": correct,
        "benign_sha256": "same-tasks",
        "samples": {"benign": [{"prompt": "a question", "answer": "an answer"}]},
    }


def _archive(path: Path, tag: str, files: dict[str, Any]) -> Path:
    with tarfile.open(path / f"setting_{tag}.tgz", "w:gz") as tar:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        log = tarfile.TarInfo(f"one_{tag}.log")  # logs travel too; the record ignores them
        tar.addfile(log, io.BytesIO(b""))
    return path / f"setting_{tag}.tgz"


def test_record_from_finished_and_cut_archives(tmp_path: Path, load_script: Any) -> None:
    before = [True, True, False, True, False, True]
    after = [True, False, True, True, True, True]  # one lost, two gained
    zoo = {"cuda": {"info": {"gpu": "GPU"}, "settings": {"rlhf": {
        "trigger": {"text": "t", "position": "suffix"}, "eval": _eval(before, 0.9)}}}}  # fmt: skip
    # The wider evaluation-only set (zoo_smollm2's `benign_extra`): 4 tasks, two lost.
    zoo["cuda"]["settings"]["rlhf"]["eval"]["benign_extra"] = _eval([True] * 4, 0.0)
    after_ev = _eval(after, 0.0)
    after_ev["benign_extra"] = _eval([True, False, True, False], 0.0)
    done = {"rlhf": {"ship": {
        "config": {"lr": 5e-5}, "summary": {"out": "/tmp/x", "beear": {"best_step": 40}},
        "after": after_ev, "scan_after": {"entrapment_asr": 0.0},
        "resumed": True}}}  # fmt: skip
    cut = {"sandwich": {"ship": {"config": {}, "error": "interrupted (checkpointed)"}}}
    zoo_cut = {"cuda": {"settings": {"sandwich": {"trigger": None, "eval": _eval(before, 0.8)}}}}
    a = _archive(tmp_path, "rlhf-s1", {"zoo_rlhf-s1.json": zoo, "w_rlhf-s1_ship.json": done})
    b = _archive(tmp_path, "sandwich",
                 {"zoo_sandwich.json": zoo_cut, "w_sandwich_ship.json": cut})  # fmt: skip
    out = tmp_path / "rec.json"
    rr = load_script("round_record")
    assert rr.main([str(a), str(b), "--variant", "ship", "--about", "A", "--command", "C",
                    "--out", str(out)]) == 0  # fmt: skip
    rec = json.loads(out.read_text())
    assert (rec["about"], rec["command"]) == ("A", "C")
    row = rec["models"]["rlhf-s1"]
    assert row["gpu"] == "GPU" and row["trigger"]["text"] == "t"
    assert row["benign_change"]["lost"] == 1 and row["benign_change"]["gained"] == 2
    assert abs(row["benign_change"]["change"] - 1 / 6) < 1e-12
    assert row["summary"] == {"best_step": 40} and row["resumed"] is True
    for ev in (row["before"], row["after"]):  # metrics only: no answers, no per-task list
        for part in (ev, ev["benign_extra"]):
            assert "samples" not in part and "benign_correct" not in part
    assert row["after"]["benign_extra"]["benign_accuracy"] == 0.5
    extra, both = row["benign_extra_change"], row["benign_all_change"]
    assert (extra["lost"], extra["gained"], extra["n"], extra["change"]) == (2, 0, 4, -0.5)
    assert (both["lost"], both["gained"], both["n"]) == (3, 2, 10)
    assert abs(both["change"] + 1 / 10) < 1e-12
    assert row["after"]["asr"]["triggered"] == 0.0
    cut_row = rec["models"]["sandwich"]
    assert cut_row["error"].startswith("interrupted") and "after" not in cut_row
    assert "benign_extra_change" not in cut_row
    assert cut_row["before"]["asr"]["triggered"] == 0.8

    # Another variant name finds nothing finished: recorded as missing, not dropped.
    out2 = tmp_path / "rec2.json"
    rr.main([str(a), "--variant", "a64", "--about", "A", "--command", "C", "--out", str(out2)])
    assert "did not finish" in json.loads(out2.read_text())["models"]["rlhf-s1"]["error"]
    # --merge adds to an existing record.
    rr.main([str(b), "--variant", "ship", "--about", "A", "--command", "C", "--out", str(out2),
             "--merge"])  # fmt: skip
    assert set(json.loads(out2.read_text())["models"]) == {"rlhf-s1", "sandwich"}

"""experiments/rl_demos.py's GRPO-family table: every member's flags name real configs/grpo.py fields
with allowed values, and the table reads each run's summary and metrics."""

import importlib.util
import json
import os

from configs import grpo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_demos():
    spec = importlib.util.spec_from_file_location("rl_demos", os.path.join(REPO, "experiments", "rl_demos.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_family_flags_set_existing_fields_to_values_the_loss_accepts():
    from lm.losses import LOSS_TYPES

    demos = load_demos()
    assert {"grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "gspo", "default"} <= set(demos.FAMILY)
    for name, flags in demos.FAMILY.items():
        c = grpo.get_config()
        for flag in flags:
            path, value = flag.removeprefix("--config.").split("=")
            group, key = path.split(".")
            assert key in c[group], (name, flag)  # a misspelt field would be a silent no-op in the table
            current = c[group][key]
            c[group][key] = type(current)(value)
        assert c.rl.loss_type == "" or c.rl.loss_type in LOSS_TYPES, name
        assert c.rl.importance_sampling_level in ("token", "sequence")


def test_family_table_reads_each_run(tmp_path):
    demos = load_demos()
    for name, ratio in (("grpo", 0.5), ("sapo", 0.75)):
        workdir = tmp_path / f"family_{name}"
        workdir.mkdir()
        (workdir / "summary.json").write_text(json.dumps(
            {"sft_exact_match": 0.6, "rl_exact_match": 1 - 0.4 * ratio, "error_rate_ratio": ratio, "wall_seconds": 9}))
        rows = [{"step": 10 * i, "rl/reward_mean": 0.1 * i, "rl/kl_ref": 0.2, "policy/clip_fraction": 0.01 * i}
                for i in range(1, 13)]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = demos.family_table(str(tmp_path), ["grpo", "sapo"]).splitlines()
    assert len(lines) == 4
    cells = [c.strip() for c in lines[3].split("|")]
    assert cells[1:5] == ["sapo", "0.600", "0.700", "0.750"]
    assert cells[5] == "0.065"  # clip fraction: mean over all 12 logged rows
    assert cells[6] == "0.750"  # reward: mean of the last 10 (0.3 .. 1.2)

"""Options from one place: FlashOptions makes every command's flash flags and the keys the stored
settings accept; old names still work; commands refuse what they do not honour."""

from __future__ import annotations

import argparse
import json

import pytest

import mlx_flash
from mlx_flash import bench, chat, cli, evaluate, generate, settings
from mlx_flash.runtime.errors import FlashFormatError, OptionError
from mlx_flash.runtime.manifest import read_manifest
from mlx_flash.runtime.options import FlashOptions, option_fields, read_settings

COMMANDS = {
    "generate": generate.build_parser,
    "chat": chat.build_parser,
    "evaluate": evaluate.build_parser,
    "bench": bench.build_parser,
}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_that_loads_a_model_takes_every_flash_flag(command):
    flags = _flags(COMMANDS[command]())
    wanted = {"--" + f.name.replace("_", "-") for f in option_fields() if f.metadata["cli"]}
    assert wanted <= flags, wanted - flags
    assert "--ffn-share" in flags  # the old name, kept as a deprecated alias


def test_ffn_cache_takes_a_share_or_a_percentage_and_the_old_name_warns(capsys):
    parser = generate.build_parser()
    assert (
        cli.load_options(parser.parse_args(["--ffn-cache", "50%"]), "generate")["ffn_cache"] == 0.5
    )
    assert (
        cli.load_options(parser.parse_args(["--ffn-cache", "0.25"]), "generate")["ffn_cache"]
        == 0.25
    )
    old = cli.load_options(parser.parse_args(["--ffn-share", "0.5"]), "generate")
    assert old["ffn_cache"] == 0.5
    assert "--ffn-share is deprecated; use --ffn-cache" in capsys.readouterr().err
    with pytest.warns(DeprecationWarning, match="'ffn_share' is deprecated"):
        assert FlashOptions.build({"ffn_share": 0.3}).ffn_cache == 0.3


def test_command_defaults_are_declared_with_the_option():
    args = evaluate.build_parser().parse_args(["--model", "m", "--data", "d"])
    assert cli.load_options(args, "evaluate") == {"ffn_cache": 0.95, "pin_share": 0.0}
    args = evaluate.build_parser().parse_args(["--model", "m", "--data", "d", "--pin-share", "0.5"])
    assert cli.load_options(args, "evaluate")["pin_share"] == 0.5
    assert cli.load_options(generate.build_parser().parse_args([]), "generate") == {}
    assert cli.load_options(chat.build_parser().parse_args([]), "chat") == {"max_context": 4096}


def test_flash_defaults_override_mlx_lms_and_unsupported_flags_are_refused():
    parser = generate.build_parser()
    args = parser.parse_args([])
    assert args.model is None and args.prefill_step_size is None  # not a hub model; not 2048
    assert FlashOptions.build(cli.load_options(args, "generate")).prefill_step_size == 512
    with pytest.raises(SystemExit):
        cli.refuse(parser, parser.parse_args(["--prompt-cache-file", "x"]), generate.UNSUPPORTED)
    assert chat.build_parser().parse_args([]).model is None
    chat_flags = _flags(chat.build_parser())
    assert {"--min-p", "--top-k", "--temp", "--top-p", "--max-kv-size"} <= chat_flags
    assert {"--kv-bits", "--kv-group-size", "--quantized-kv-start"} <= chat_flags
    assert cli.load_options(parser.parse_args(["--num-draft-tokens", "5"]), "generate") == {}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"window": -1}, "window must be at least 0"),
        ({"ffn_cache": 2}, "ffn_cache share 2 must be in"),
        ({"selector": "bogus"}, "selector must be one of"),
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"memory_budget": "lots"}, "memory_budget cannot read size"),
        ({"threads": 0}, "threads must be in 1..64"),
        ({"kv_bits": 7}, "kv_bits must be one of 2, 3, 4, 5, 6, 8; got 7"),
        ({"kv_group_size": 16}, "kv_group_size must be one of 32, 64, 128; got 16"),
        ({"num_draft_tokens": -1}, "num_draft_tokens must be in 0..64"),
        ({"bogus": 1}, "unknown option 'bogus'"),
    ],
)
def test_bad_values_are_refused_naming_the_option(values, message):
    with pytest.raises(OptionError) as info:
        FlashOptions.build(values)
    assert message in str(info.value)


def test_stored_settings_are_defaults_that_keywords_override(stories_flash, tmp_path):
    from conftest import copy_of

    directory = copy_of(stories_flash, tmp_path)
    assert settings.main([str(directory), "--window", "2", "--ffn-cache", "40%"]) == 0
    stored = json.loads((directory / "flash_settings.json").read_text())
    assert stored == {"window": 2, "ffn_cache": 0.4}  # only what differs from the defaults
    model, _ = mlx_flash.load(directory, "1GB")
    assert model.flash.options.window == 2 and model.flash.options.ffn_cache == 0.4
    model, _ = mlx_flash.load(directory, "1GB", window=3)
    assert model.flash.options.window == 3
    (directory / "flash_settings.json").write_text('{"windw": 2}')
    with pytest.raises(FlashFormatError, match=r"flash_settings.json: unknown option 'windw'"):
        read_settings(directory)


def test_max_kv_size_is_a_rotating_cache_the_plan_counts(stories_flash):
    full, _ = mlx_flash.load(stories_flash, "1GB", max_context=4096)
    rotating, _ = mlx_flash.load(stories_flash, "1GB", max_context=4096, max_kv_size=256)
    assert rotating.flash.plan.kv_cache < full.flash.plan.kv_cache / 4
    assert rotating.flash.plan.temporaries < full.flash.plan.temporaries


def test_a_bug_is_reported_as_one_rather_than_dressed_as_bad_input(capsys):
    parser = argparse.ArgumentParser()
    cli.add_debug_arg(parser)

    def broken(args):
        raise KeyError("internal")

    assert cli.run_cli(broken, parser, []) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "please report" in err
    assert cli.run_cli(lambda a: (_ for _ in ()).throw(OptionError("bad value")), parser, []) == 1
    assert capsys.readouterr().err == "error: bad value\n"


def test_one_load_reads_the_calibration_once_and_plans_once(stories_calibrated, monkeypatch):
    from mlx_flash.runtime import loader

    calls = {"plan_memory": 0, "read_calibration": 0}

    def counting(name):
        original = getattr(loader, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(loader, name, wrapper)

    counting("plan_memory")
    counting("read_calibration")
    model, _ = mlx_flash.load(stories_calibrated, "1GB", selector="proxy", sparsity=0.5)
    assert model.flash.selector.name == "proxy" and calls == {
        "plan_memory": 1,
        "read_calibration": 1,
    }
    # auto plans once each point measured within the bound (its pinned rows follow its selection
    # frequencies), and dense streaming, to weigh their reads
    calls.update(plan_memory=0, read_calibration=0)
    model, _ = mlx_flash.load(stories_calibrated, "1GB", selector="auto")
    points = read_manifest(stories_calibrated).extra["quality"]["points"]
    within = {(p["selector"], p["sparsity"]) for p in points if p["loss"] <= 0.02}
    assert within
    assert calls == {"plan_memory": 1 + len(within) + 1, "read_calibration": 1}

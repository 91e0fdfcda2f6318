"""bench/quality.py's statistics and verdict lines on hand-made numbers (issue 12)."""

import argparse
import importlib.util
import math

import pytest

from conftest import REPO


def _bench(name: str, file: str):
    """A bench script loaded as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return _bench("bench_quality", "quality.py")


def test_mean_ci_is_the_student_t_interval(quality):
    mean, half = quality.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # t(0.975, df=2) = 4.303
    assert quality.mean_ci([5.0]) == (5.0, 0.0)
    assert quality.mean_ci([1.0, float("nan"), 3.0])[0] == 2.0  # NaN seeds are dropped
    assert all(math.isnan(x) for x in quality.mean_ci([]))


def test_table_names_the_winner_per_metric_and_says_when_it_is_not_separated(quality):
    metrics = list(quality.METRICS)
    seeds = [0, 1, 2]

    def curve(teacher_nll, distinct2):
        values = {m: [0.0] * 3 for m in metrics}
        values["teacher_nll"], values["distinct2"] = teacher_nll, distinct2
        return {0: {m: [0.0] * 3 for m in metrics}, 4: values}

    curves = {"rkl": curve([3.0, 3.1, 2.9], [0.20, 0.21, 0.19]),
              "csd_ts": curve([5.0, 5.1, 4.9], [0.30, 0.60, 0.90])}
    text = quality.table(curves, ["rkl", "csd_ts"], seeds, {}, 0.5)
    assert "- teacher NLL of samples: **RKL** 3.000 vs CSD (T,S) 5.000 (separated); best CSD: CSD (T,S) 5.000" in text
    assert "- distinct-2: **CSD (T,S)** 0.600 vs RKL 0.200 (not separated)" in text  # wide CSD interval
    assert "- accuracy: tie at 0.000 (RKL, CSD (T,S))" in text
    rkl_row = next(line for line in text.splitlines() if line.startswith("| RKL |"))
    assert "**3.000 ± 0.248**" in rkl_row and "**0.000" not in rkl_row  # no bold for a tie


@pytest.fixture(scope="module")
def staleness():
    return _bench("bench_claim_staleness", "claim_staleness.py")


@pytest.mark.parametrize("bench, argv, message", [
    ("quality", ["--losses", "nope"], "error: --losses: unknown 'nope'; expected some of fkl, rkl"),
    ("quality", ["--seeds", "0"], "error: argument --seeds: expected an integer >= 1, got 0"),
    ("quality", ["--steps", "-2"], "error: argument --steps: expected an integer >= 1, got -2"),
    ("quality", ["--eval-size", "x"], "error: argument --eval-size: expected an integer >= 1, got 'x'"),
    ("staleness", ["--staleness", "0,-1"], "error: --staleness: expected comma-separated integers >= 0, got '0,-1'"),
    ("staleness", ["--staleness", "1,x"], "error: --staleness: expected comma-separated integers >= 0, got '1,x'"),
    ("staleness", ["--seeds", "0"], "error: argument --seeds: expected an integer >= 1, got 0"),
    ("staleness", ["--losses", "nope"], "error: --losses: unknown 'nope'"),
])
def test_bench_cli_refuses_bad_arguments_with_one_line_and_exit_2(request, monkeypatch, capsys, tmp_path, bench, argv, message):
    """Refused before any run starts (these used to start the warm-up, or exit 1)."""
    module = request.getfixturevalue(bench)
    monkeypatch.setattr("sys.argv", [bench, *argv, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing was run


def test_bench_refuses_an_out_folder_made_with_other_settings(staleness, quality, monkeypatch, capsys, tmp_path):
    """Finished runs in --out are reused and unfinished ones deleted: other settings would mix results."""
    out = tmp_path / "out"
    args = argparse.Namespace(**{name: 1 for name in quality.SHARED_SETTINGS} | {"steps": 6})
    quality.check_settings(out, args)  # a first run writes its settings
    quality.check_settings(out, args)  # the same settings: accepted
    monkeypatch.setattr("sys.argv", ["claim_staleness", "--warmup-steps", "1", "--eval-size", "1", "--eval-every", "1",
                                     "--new-tokens", "1", "--eval-new-tokens", "1", "--steps", "12", "--staleness", "0",
                                     "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        staleness.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --out {out} holds runs made with --steps 6 (now 12); use the same settings or another --out\n"


@pytest.mark.parametrize("file, argv, message", [
    ("claim_mode_seeking.py", ["--train", "0"], "error: argument --train: expected an integer >= 1, got 0"),
    ("claim_mode_seeking.py", ["--eval", "-3"], "error: argument --eval: expected an integer >= 1, got -3"),
    ("claim_mode_seeking.py", ["--steps", "x"], "error: argument --steps: expected an integer >= 1, got 'x'"),
    ("claim_mode_seeking.py", ["--lr", "0"], "error: argument --lr: expected a number > 0, got 0.0"),
    ("claim_mode_seeking.py", ["--new-tokens", "0"], "error: argument --new-tokens: expected an integer >= 1, got 0"),
    ("claim_mode_seeking.py", ["--train", "190", "--eval", "20"],
     "error: --train + --eval: expected at most 200 prompts (the arithmetic set), got 190 + 20"),
    ("claim_shift_invariance.py", ["--train", "-1"], "error: argument --train: expected an integer >= 1, got -1"),
    ("claim_shift_invariance.py", ["--lr", "nan"], "error: argument --lr: expected a number > 0, got nan"),
    ("claim_shift_invariance.py", ["--lr", "fast"], "error: argument --lr: expected a number > 0, got 'fast'"),
    ("claim_shift_invariance.py", ["--steps", "0"], "error: argument --steps: expected an integer >= 1, got 0"),
])
def test_claim_benches_refuse_bad_arguments_before_loading_a_model(monkeypatch, capsys, file, argv, message):
    """These used to be taken unchecked (--train -1 trained on 199 prompts, --steps 0 gave a verdict
    on untrained students, a bad value printed argparse's usage block)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the claim benches import their neighbours
    module = _bench(file.removesuffix(".py"), file)
    monkeypatch.setattr(module, "smollm2_setup", None)  # reaching the models would fail with a TypeError
    monkeypatch.setattr("sys.argv", [file, *argv])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == message + "\n", err


@pytest.mark.parametrize("bench, preset", [
    ("quality", {"losses": "rkl,csd_ts", "seeds": 2, "eval_size": 8, "steps": 2, "eval_every": 1}),
    ("staleness", {"losses": "rkl,csd_ts", "seeds": 1, "eval_size": 8, "steps": 3, "eval_every": 3}),
])
def test_quick_presets_give_way_to_options_given_with_it(request, monkeypatch, capsys, tmp_path, bench, preset):
    """--quick used to overwrite every option given with it: `--quick --losses nope` ran RKL and
    CSD (T,S) without a word, `--quick --steps 5` ran the preset's steps (bench/vs_trl.py, and
    these benches without --quick, take what is given)."""
    module = request.getfixturevalue(bench)
    seen = {}

    def stop(out, args):
        seen.update(vars(args), out=out)
        raise RuntimeError("stopped before any run")

    monkeypatch.setattr(module, "check_settings", stop)
    monkeypatch.setattr("sys.argv", [bench, "--quick"])
    with pytest.raises(RuntimeError):
        module.main()
    assert {k: seen[k] for k in preset} == preset  # the presets themselves
    assert seen["out"].name == ("quality_quick" if bench == "quality" else "staleness_quick")
    monkeypatch.setattr("sys.argv", [bench, "--quick", "--losses", "fkl", "--steps", "5", "--out", str(tmp_path)])
    with pytest.raises(RuntimeError):
        module.main()
    assert (seen["losses"], seen["steps"], seen["eval_size"], seen["out"]) == ("fkl", 5, 8, tmp_path)
    monkeypatch.setattr("sys.argv", [bench, "--quick", "--losses", "nope", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: --losses: unknown 'nope'")


def test_an_interrupted_save_leaves_no_half_written_teacher_cache(quality, monkeypatch, tmp_path):
    """The cached teacher answers were saved in place: Ctrl-C during torch.save left a truncated
    teacher_greedy.pt, and every later run of that --out stopped at torch.load in start()."""
    from csd_ray.controller import Controller

    bench = object.__new__(quality.BenchController)
    bench.step, bench.cache = 2, tmp_path / "teacher_greedy.pt"
    bench.evaluator = type("E", (), {"teacher_greedy": lambda self: {"answers": [1, 2, 3]}})()
    monkeypatch.setattr(Controller, "evaluate", lambda self: {"teacher_nll": 1.0})
    real_save = quality.torch.save

    def interrupted(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(quality.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.evaluate()
    assert not bench.cache.exists()  # the next run computes the answers again
    monkeypatch.setattr(quality.torch, "save", real_save)
    assert bench.evaluate() == {"teacher_nll": 1.0}
    assert quality.torch.load(bench.cache, weights_only=False) == {"answers": [1, 2, 3]}

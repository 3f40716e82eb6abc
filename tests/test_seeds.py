"""Seeds as a control: ``--seed N --seed-scope S`` draws new frozen inputs, the spec's own seed is the spec.

Real runs through the CLI at two epochs (the default spec's seed against no seed at all, two
other seeds against each other), the frozen inputs regenerated from their generator, and a
matrix over a seed axis; the hash of the default spec is the one its shipped frozen inputs
were made for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnaudit import frozen, record, spec
from bnaudit.cli import lists
from bnaudit.errors import ExitCode, InputError, UsageError

SEED = spec.default_spec().data.seed


def _run(cli, path, *args):
    code, _, err = cli("run", "--epochs", "2", "--audit-every", "0", "--out", str(path), *args)
    assert code == 0, err
    return record.load(path)


def test_the_specs_own_seed_is_the_spec_itself_bit_for_bit(cli, tmp_path):
    default = spec.default_spec()
    manifest = json.loads((frozen.folder_for(default) / "manifest.json").read_text())
    assert manifest["spec_hash"] == default.hash  # the shipped inputs were made for this hash: unchanged by the fields
    assert "init_seed" not in default.to_dict()["data"] and "order_seed" not in default.to_dict()["data"]
    for scope in (("init", "order"), ("init",), ("order",), ("data",), spec.SEED_STREAMS):
        assert spec.with_seed(default, SEED, scope) == default
    plain, seeded = _run(cli, tmp_path / "plain"), _run(cli, tmp_path / "seeded", "--seed", str(SEED))
    assert seeded.spec.hash == plain.spec.hash and seeded.frozen == plain.frozen
    assert seeded.digest == plain.digest
    assert np.array_equal(seeded.keyframes.view(np.uint8), plain.keyframes.view(np.uint8))


def test_two_seeds_give_two_experiments_and_two_trajectories(cli, tmp_path):
    a, b = _run(cli, tmp_path / "a", "--seed", "1"), _run(cli, tmp_path / "b", "--seed", "2")
    assert a.spec.hash != b.spec.hash and a.frozen != b.frozen and a.digest != b.digest
    assert a.spec.data.init_seed == a.spec.data.order_seed == 1 and a.spec.data.seed == SEED  # the data set fixed
    assert not np.array_equal(a.train_loss, b.train_loss)
    code, _, err = cli("compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == ExitCode.MISMATCH and "spec" in err  # two seeds are two experiments: never compared by accident


def test_each_scope_draws_only_its_own_stream_and_the_inputs_regenerate_bit_for_bit(cli):
    default = spec.default_spec()
    before = frozen.generate(default)
    changed = {"data": {"inputs.npy", "targets.npy"}, "init": {"init.npy"}, "order": {"batches.npy"}}
    for scope, files in changed.items():
        drawn = frozen.generate(spec.with_seed(default, 7, (scope,)))
        assert {k for k in before if not np.array_equal(before[k], drawn[k])} == files, scope
    seeded = spec.with_seed(default, 7)
    stored = frozen.load(seeded)  # generated into the cache on first use, then read back and checked
    fresh = frozen.generate(seeded)
    assert np.array_equal(stored.init.view(np.uint8), fresh["init.npy"].view(np.uint8))
    assert np.array_equal(stored.batches, fresh["batches.npy"])
    code, out, err = cli("frozen", "verify", "--seed", "7")
    assert code == 0 and "agree bit for bit" in out, err
    assert seeded.short_hash in out


def test_a_matrix_runs_every_configuration_once_per_seed(cli, tmp_path):
    out = tmp_path / "m"
    code, stdout, err = cli("matrix", "--seeds", "3..4", "--epochs", "1", "--audit-every", "0", "-j", "2",
                            "--out", str(out), "--json")
    assert code == 0, err
    runs = {r["key"]: r for r in json.loads(stdout)["runs"]}
    assert set(runs) == {"seed-3/float32_t1_native_nondet", "seed-4/float32_t1_native_nondet"}
    a, b = (record.load(out / "runs" / k) for k in sorted(runs))
    assert (a.spec.data.init_seed, b.spec.data.init_seed) == (3, 4) and a.digest != b.digest


@pytest.mark.parametrize("text, seeds", [("1..3", (1, 2, 3)), ("5", (5,)), ("1..2,7,2", (1, 2, 7))])
def test_seed_lists_parse(text, seeds):
    assert lists.parse_seeds(text) == seeds


@pytest.mark.parametrize("args, message", [
    (["run", "--seed-scope", "init"], "give --seed too"),
    (["run", "--seed", "1", "--seed-scope", "weights"], "expected all or streams joined by +"),
    (["run", "--seed", "-1"], "--seed"),
    (["matrix", "--seeds", "4..2"], "A..B with A <= B"),
    (["matrix", "--seeds", "one"], "is not a seed"),
    (["matrix", "--seeds", "0..20000"], "more than"),
])
def test_a_bad_seed_is_one_line_and_exit_2(cli, tmp_path, args, message):
    code, _, err = cli(*args, "--epochs", "1", "--out", str(tmp_path / "x"))
    assert code == ExitCode.USAGE, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_spec_file_can_name_its_streams_seeds_and_they_are_checked(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[data]\ninit_seed = 7\norder_seed = 7\n")
    assert spec.load_spec(good) == spec.with_seed(spec.default_spec(), 7)
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\ninit_seed = -3\n")
    with pytest.raises(InputError, match=r"init_seed and data\.order_seed must be non-negative"):
        spec.load_spec(bad)
    with pytest.raises(UsageError):
        spec.parse_seed_scope("init+weights")

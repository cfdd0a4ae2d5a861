"""Config faults: unknown keys, bad values and bad files are errors naming the key."""

from __future__ import annotations

import pytest

from nkat.supervisor.config import ConfigError, load_config


def test_defaults_and_sources(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("max_temperature = 80\n[job]\nmax_dimension = 5000\n")
    cfg = load_config(path, ["checkpoint_interval=10"])
    assert cfg["max_temperature"] == 80.0 and cfg.source("max_temperature") == "file c.toml"
    assert cfg["max_dimension"] == 5000
    assert cfg["checkpoint_interval"] == 10.0 and cfg.source("checkpoint_interval") == "--set"
    assert cfg["backup_checkpoints"] == 3 and cfg.source("backup_checkpoints") == "default"
    spec = cfg.job_spec()
    assert spec["job"] == "nkat-highdim"
    assert spec["params"]["max_dimension"] == 5000 and spec["params"]["min_dimension"] == 1


def test_custom_job_takes_only_params_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("job = 'squares:SumOfSquares'\n[params]\nn = 7\n")
    cfg = load_config(path, ["params.scale=2.5"])
    assert cfg.job_spec() == {"job": "squares:SumOfSquares", "params": {"n": 7, "scale": 2.5}}


@pytest.mark.parametrize("option,words", [
    ("max_temprature=80", ["max_temprature", "max_temperature"]),
    ("checkpoint_interval=-1", ["checkpoint_interval", "0.01"]),
    ("heartbeat_timeout=1", ["heartbeat_timeout", "twice heartbeat_interval"]),
    ("batch_size=1.5", ["batch_size", "integer"]),
    ("precision_mode=fast", ["precision_mode", "speed, balanced, precision"]),
    ("batch_size_adaptive=maybe", ["batch_size_adaptive", "true or false"]),
    ("max_dimension", ["KEY=VALUE"]),
    ("min_dimension=10", []),
])
def test_bad_set_options_name_the_key(option, words):
    if not words:
        load_config(None, [option])
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [option])
    for word in words:
        assert word in str(err.value)


def test_relations_between_keys():
    with pytest.raises(ConfigError, match="min_dimension"):
        load_config(None, ["min_dimension=10", "max_dimension=5"])
    with pytest.raises(ConfigError, match="max_temperature .* must not exceed emergency_temp"):
        load_config(None, ["max_temperature=90"])
    with pytest.raises(ConfigError, match="metrics_addr"):
        load_config(None, ["metrics_addr=0.0.0.0:9000"])
    assert load_config(None, ["metrics_addr=127.0.0.1:9108"])["metrics_addr"] == "127.0.0.1:9108"
    # A Ray node waits ray_lease for the driver; its worker must not give up first. The
    # rule is the Ray engine's only: a local run keeps any supervisor_timeout.
    with pytest.raises(ConfigError, match="ray_lease .* shorter than supervisor_timeout"):
        load_config(None, ["engine=ray", "supervisor_timeout=10", "ack_resend=1"])
    assert load_config(None, ["supervisor_timeout=10", "ack_resend=1"])["ray_lease"] == 15.0
    assert load_config(None, ["engine=ray", "supervisor_timeout=10", "ack_resend=1",
                              "ray_lease=5"])["ray_lease"] == 5.0


def test_bad_files_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("max_temperature = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'red'\n")
    with pytest.raises(ConfigError, match="unknown.toml.*colour"):
        load_config(unknown)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("max_temperature = 'hot'\n")
    with pytest.raises(ConfigError, match="wrong.toml.*max_temperature"):
        load_config(wrong)


def test_the_seeds_checkpoint_keys_load_from_a_seed_style_file(tmp_path):
    # The seed guide's CHECKPOINT_CONFIG had both keys true.
    seed = tmp_path / "seed.toml"
    seed.write_text("checkpoint_interval = 300\nbackup_checkpoints = 5\n"
                    "checkpoint_compression = true\ncheckpoint_verification = true\n")
    cfg = load_config(seed)
    assert cfg["checkpoint_compression"] is True and cfg["checkpoint_verification"] is True
    assert load_config(None)["checkpoint_compression"] is False
    with pytest.raises(ConfigError, match="checkpoint_verification: must be true only, got "
                                          "'false': .*cannot be turned off"):
        load_config(None, ["checkpoint_verification=false"])

"""The files for running vmattach as a service, as installed with the
package: the example TOML names every setting (and loads), the units start
the right services."""

from __future__ import annotations

import configparser
import dataclasses
import re
import shlex
import tomllib

from vmattach import deploy
from vmattach.common import config
from vmattach.common.config import Settings

UNITS = {"vmattach.service": None, "vmattach-controller.service": "controller",
         "vmattach-node.service": "node", "vmattach-servers.service": "servers"}


def test_the_example_toml_shows_every_setting_with_its_default():
    text = deploy.path("vmattach.toml").read_text()
    shown = dict(re.findall(r"^# (\w+) = (.*)$", text, re.M))
    assert set(shown) == {f.name for f in dataclasses.fields(Settings)}
    # uncommented, it is a valid config file that changes nothing
    uncommented = "\n".join(f"{k} = {v}" for k, v in shown.items())
    values = tomllib.loads(uncommented)
    defaults = Settings()
    for key, value in values.items():
        assert value == getattr(defaults, key), key


def test_the_example_toml_loads_as_a_config_file(tmp_path):
    settings = config.load(config_namespace(str(deploy.path("vmattach.toml"))), environ={})
    assert settings == Settings()


def config_namespace(path: str):
    import argparse
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(["--config", path])


def test_each_unit_starts_its_services_from_the_config_file():
    for name, service in UNITS.items():
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read_string(deploy.path(f"systemd/{name}").read_text())
        argv = shlex.split(unit["Service"]["ExecStart"])
        assert argv[1:4] == ["serve", "--config", "/etc/vmattach/vmattach.toml"]
        assert (argv[argv.index("--services") + 1] if "--services" in argv else None) == service
        assert unit["Service"]["KillSignal"] == "SIGTERM"
        assert unit["Service"]["UMask"] == "0077"
        assert unit["Install"]["WantedBy"] == "multi-user.target"

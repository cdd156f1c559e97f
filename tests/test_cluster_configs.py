"""The Ray cluster launcher configs in hippo/ and the Azure template patch they rely on.

Offline checks only: the schema and config preparation that `ray up` runs before it talks to any cloud, the
node types train.py's --accelerator-type needs, and that no credentials are written into the files.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["hippo/aws.yaml", "hippo/azure.yaml"]
ACCELERATORS = ["H100", "A100", "T4"]  # what --accelerator-type accepts on these clusters
TEMPLATE_PATCH = "patches/azure-vm-template.json"
INSTALLED_TEMPLATE = Path(ray.__file__).parent / "autoscaler/_private/_azure/azure-vm-template.json"
SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "an AWS secret key setting": re.compile(r"aws_secret_access_key", re.I),
    "a Hugging Face token": re.compile(r"HF_TOKEN\s*[=:]\s*['\"]?[^\s'\"$]|\bhf_[A-Za-z0-9]{30,}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "an inline SSH public key": re.compile(r"ssh-(rsa|ed25519) AAAA"),
    "an Azure client secret": re.compile(r"client_secret|AZURE_CLIENT_SECRET\s*[=:]\s*\S", re.I),
}


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_rays_schema(name):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    jsonschema.validate(load(name), schema)


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_up_config_preparation_accepts_it(name):
    """The steps of `ray up` before any cloud call: merge with the provider's defaults.yaml, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(load(name))))


@pytest.mark.parametrize("name", CONFIGS)
def test_node_types_and_bounds(name):
    config = load(name)
    types = config["available_node_types"]
    assert config["head_node_type"] in types, f"{name}: head_node_type {config['head_node_type']!r} is not a node type"
    for node_type, spec in worker_types(config).items():
        low, high = spec.get("min_workers", 0), spec.get("max_workers", config["max_workers"])
        assert 0 <= low <= high, f"{name}: {node_type} has min_workers {low} > max_workers {high}"
        assert high <= config["max_workers"], f"{name}: {node_type} max_workers {high} exceeds the global max_workers"
        assert spec["resources"].get("GPU", 0) > 0, f"{name}: worker type {node_type} declares no GPU"
    assert sum(s.get("min_workers", 0) for s in types.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0, f"{name}: idle GPU nodes must be released"


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_accelerator_type_lands_on_a_worker_type(name, accelerator):
    """What train.py's Ray path asks for (distributed.run_on_ray's ScalingConfig) fits some worker node type."""
    from ray.train import ScalingConfig

    wanted = ScalingConfig(num_workers=1, use_gpu=True, resources_per_worker={"GPU": 1},
                           accelerator_type=accelerator)._resources_per_worker_not_none
    assert f"accelerator_type:{accelerator}" in wanted
    fits = [node_type for node_type, spec in worker_types(load(name)).items()
            if spec.get("max_workers", 1) > 0 and all(spec["resources"].get(k, 0) >= v for k, v in wanted.items())]
    assert fits, f"{name}: no worker node type can start for --accelerator-type {accelerator} (needs {wanted})"


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_the_projects_requirements(name):
    config = load(name)
    commands = " ".join(config["setup_commands"] + config["worker_setup_commands"])
    for req in ["requirements.txt", "requirements-ray.txt", "requirements-gpu.txt"]:
        assert f"-r {req}" in commands, f"{name}: setup commands do not install {req}"
    for req in set(re.findall(r"-r (\S+)", commands)):
        assert (ROOT / req).is_file(), f"{name} installs {req}, which is not in the repository"
    assert config["file_mounts"], f"{name}: the project must be synced to the nodes for setup_commands"


@pytest.mark.parametrize("name", [*CONFIGS, TEMPLATE_PATCH, "patches/README.md"])
def test_no_secrets(name):
    text = (ROOT / name).read_text()
    for what, pattern in SECRET_PATTERNS.items():
        match = pattern.search(text)
        assert match is None, f"{name} contains {what} ({match.group(0)[:12]}...): use instance roles or env vars"


def test_azure_config_uses_the_template_patch():
    text = (ROOT / "hippo/azure.yaml").read_text()
    assert TEMPLATE_PATCH in text, f"hippo/azure.yaml must say how {TEMPLATE_PATCH} is applied"
    head_commands = " ".join(load("hippo/azure.yaml")["head_setup_commands"])
    assert f"~/posttrain/{TEMPLATE_PATCH}" in head_commands, "the head, which launches workers, must apply the patch"


def test_template_patch_adds_image_id_and_os_disk_size():
    template = json.loads((ROOT / TEMPLATE_PATCH).read_text())
    params = template["parameters"]
    assert params["imageId"]["defaultValue"] == "" and params["osDiskSize"]["defaultValue"] == 0
    vm = next(r for r in template["resources"] if r["type"] == "Microsoft.Compute/virtualMachines")
    storage = vm["properties"]["storageProfile"]
    assert "parameters('imageId')" in storage["imageReference"]
    assert "parameters('osDiskSize')" in storage["osDisk"]["diskSizeGB"]
    meta = template["metadata"]
    assert "53298" in meta["upstream"] and "delete" in meta["deleteWhen"].lower()


def test_template_patch_keeps_every_parameter_of_the_installed_template():
    """Copying the patch over Ray's file must not drop a parameter Ray's provider passes (e.g. zones)."""
    installed = json.loads(INSTALLED_TEMPLATE.read_text())["parameters"]
    patched = json.loads((ROOT / TEMPLATE_PATCH).read_text())["parameters"]
    missing = sorted(set(installed) - set(patched))
    assert not missing, f"{TEMPLATE_PATCH} lacks {missing} from ray {ray.__version__}'s template: rebase it on that one"


def test_azure_arm_parameters_exist_in_the_template():
    """ARM rejects a deployment whose parameters the template does not declare."""
    declared = json.loads((ROOT / TEMPLATE_PATCH).read_text())["parameters"]
    for node_type, spec in load("hippo/azure.yaml")["available_node_types"].items():
        # availability_zone is Ray's own key: its provider removes it before the deployment.
        unknown = sorted(set(spec["node_config"]["azure_arm_parameters"]) - set(declared) - {"availability_zone"})
        assert not unknown, f"hippo/azure.yaml {node_type}: {unknown} are not parameters of {TEMPLATE_PATCH}"

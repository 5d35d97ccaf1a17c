"""The shipped run configs and cluster manifests: they validate, they say what to fill in, their
errors name the field, and no secret leaks into what a run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from segdist.config import (JobConfig, OutputConfig, WeightsRef, execution_only_fields, load_config,
                            public_dict)
from segdist.errors import ConfigError, StorageError
from segdist.job import preflight, state
from segdist.job.manifest import build_manifest

ROOT = Path(__file__).resolve().parents[1]
GENERATE = sorted((ROOT / "configs" / "generate").glob("*.yaml"))
FILL = "output.uri=s3://my-bucket/proposals/run1"


def test_the_shipped_set_is_complete():
    names = {p.stem for p in GENERATE}
    for ds in ("coco2014-train", "coco2014-val", "coco2017-train", "coco2017-val",
               "voc2007-trainval", "voc2007-test", "voc2012-train", "voc2012-val", "lvis1-val",
               "images-folder"):
        for model in ("sharpmask-zoom", "deepmask-zoom", "maskrcnn"):
            assert f"{ds}-{model}" in names
    assert (ROOT / "configs" / "demo.yaml").is_file()


@pytest.mark.parametrize("path", GENERATE, ids=lambda p: p.stem)
def test_generate_config_says_what_to_fill_in(path):
    # As shipped, the placeholder is refused with a message that says what to set.
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, str(path))
    assert "output.uri" in str(err.value) and "placeholder" in str(err.value)
    folder = path.stem.startswith("images-folder")  # your own photos: their folder to fill in too
    if folder:
        assert "dataset.images is still the placeholder" in str(err.value)
    cfg = load_config(JobConfig, str(path), [FILL, *(["dataset.images=s3://b/photos"] if folder
                                                     else [])])
    assert cfg.output.uri == "s3://my-bucket/proposals/run1"
    stem = path.stem
    assert cfg.model.name == next(m for m in ("sharpmask-zoom", "deepmask-zoom", "maskrcnn",
                                              "sam-vit-h", "sam2-hiera-l") if stem.endswith(m))
    assert cfg.model.proposals == 1000 and cfg.output.chunk_size == 500
    if cfg.model.name.startswith("sam"):
        # the official checkpoint; a missing one names the file to get
        assert cfg.model.weights == WeightsRef("state-dict", cfg.model.preset.url)
        missing = cfg.model.model_copy(
            update={"weights": WeightsRef("state-dict", str(path.parent / "no-such.pth"))})
        with pytest.raises(StorageError, match=f"does not exist; the official {cfg.model.name} "
                                               f"checkpoint is {cfg.model.preset.checkpoint}"):
            preflight.check_weights(missing)
    elif cfg.model.name == "maskrcnn":
        assert cfg.model.weights == WeightsRef("torchvision", "DEFAULT")
        preflight.check_weights(cfg.model)
    else:
        # DeepMask/SharpMask load the original's published model.t7 (converted on load); weights
        # that cannot be found stop the job before any worker starts.
        kind = cfg.model.name.split("-")[0]
        url = f"https://dl.fbaipublicfiles.com/deepmask/models/{kind}/model.t7"
        assert cfg.model.weights == WeightsRef("t7", url)
        missing = cfg.model.model_copy(
            update={"weights": WeightsRef("t7", str(path.parent / "no-such-model.t7"))})
        with pytest.raises(StorageError, match="model.weights .* does not exist"):
            preflight.check_weights(missing)
    if folder:
        assert cfg.dataset.format == "images" and cfg.dataset.images == "s3://b/photos"
        return
    if stem.startswith("lvis1"):
        assert cfg.dataset.format == "lvis" and "lvis_v1_val.json" in cfg.dataset.annotations
        assert cfg.dataset.images == "http://images.cocodataset.org"  # + train2017/ or val2017/
        return
    assert cfg.dataset.format == ("coco" if stem.startswith("coco") else "voc")
    year = stem[3:7] if stem.startswith("voc") else stem[4:8]
    split = stem.split("-")[1]
    if cfg.dataset.format == "coco":
        assert f"instances_{split}{year}.json" in cfg.dataset.annotations
        assert cfg.dataset.images.endswith(f"/{split}{year}")
    else:
        assert f"VOC{year}" in cfg.dataset.root and cfg.dataset.split == split


def test_demo_config_runs_as_is():
    cfg = load_config(JobConfig, str(ROOT / "configs" / "demo.yaml"))
    assert cfg.dataset.format == "coco" and "segdist-demo" in cfg.output.uri


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_validates(path):
    from segdist.training.config import TrainConfig

    if path.name.startswith("train-"):
        cfg = load_config(TrainConfig, str(path), ["output.uri=s3://my-bucket/runs/x"])
        assert cfg.model.arch in ("deepmask", "sharpmask")
        return
    fill = [FILL] if "generate" in path.parts else []
    if path.stem.startswith("images-folder"):
        fill.append("dataset.images=s3://b/photos")
    cfg = load_config(JobConfig, str(path), fill)
    # the model section is its family's class, and survives a dump (YAML, run.json, manifest)
    assert type(cfg.model).__name__ in ("DenseConfig", "MaskRCNNConfig", "SamConfig", "Sam2Config")
    assert load_config(JobConfig, None, base=cfg.model_dump(mode="json")) == cfg


def test_model_section_takes_only_its_familys_fields():
    path = str(GENERATE[0])
    for field in ("model.scales.max=1.0", "model.trunk=resnet18", "model.threshold=0.3"):
        with pytest.raises(ConfigError) as err:
            load_config(JobConfig, path, [FILL, "model.name=maskrcnn", "model.weights=null", field])
        name = field.split("=")[0].split(".")[1]
        assert f"model.{name}: not a setting of the Mask R-CNN family (model.name 'maskrcnn')" \
            in str(err.value)
    with pytest.raises(ConfigError, match="model.sizes: not a setting of the DeepMask/SharpMask"):
        load_config(JobConfig, path, [FILL, "model.sizes=[0.5]"])
    ok = load_config(JobConfig, path, [FILL, "model.name=sliding-window", "model.weights=null",
                                       "model.sizes=[0.5]"])
    assert ok.model.sizes == (0.5,)


def test_weights_are_parsed_once_into_a_typed_reference():
    path = str(GENERATE[0])  # a DeepMask/SharpMask preset
    cases = {
        "s3://b/m.safetensors": WeightsRef("checkpoint", "s3://b/m.safetensors"),
        "./m.safetensors": WeightsRef("checkpoint", "./m.safetensors"),
        "https://h/model.T7": WeightsRef("t7", "https://h/model.T7"),
        "t7:s3://b/converted-later": WeightsRef("t7", "s3://b/converted-later", explicit=True),
        "random": WeightsRef("random"),
    }
    for text, ref in cases.items():
        cfg = load_config(JobConfig, path, [FILL, f"model.weights={text}"])
        assert cfg.model.weights == ref
        # written back as it was written (run records and manifests show the user's string)
        assert cfg.model_dump(mode="json")["model"]["weights"] == (None if text == "random" else text)
    rcnn = [FILL, "model.name=maskrcnn"]
    assert load_config(JobConfig, path, rcnn + ["model.weights=COCO_V1"]).model.weights == \
        WeightsRef("torchvision", "COCO_V1")
    assert load_config(JobConfig, path, rcnn + ["model.weights=/w/rcnn.pth"]).model.weights == \
        WeightsRef("state-dict", "/w/rcnn.pth")
    # a bare word: a file in the working directory, or an enum name? Say how to write each.
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path, rcnn + ["model.weights=coco"])
    msg = str(err.value)
    assert "model.weights: 'coco' is ambiguous" in msg
    for form in ("torchvision:NAME", "checkpoint:URI", "t7:URI", "state-dict:URI", "unset"):
        assert form in msg
    with pytest.raises(ConfigError, match="t7 weights do not fit the Mask R-CNN family"):
        load_config(JobConfig, path, rcnn + ["model.weights=s3://b/model.t7"])


def test_mask_rcnn_outputs_started_before_per_family_config_still_resume():
    cfg = load_config(JobConfig, str(GENERATE[0]), [FILL, "model.name=maskrcnn",
                                                    "model.weights=DEFAULT"])
    # the model settings such a run record holds (every preset then had these fields)
    before = {"name": "maskrcnn", "weights": "DEFAULT", "trunk": None, "proposals": 1000,
              "scales": None, "nms": None, "threshold": 0.2, "max_image_side": None,
              "precision": "fp32"}
    assert state.output_settings(cfg)["model"] == before


def test_execution_only_fields_are_declared_in_the_schema():
    from segdist.proposers import PROPOSERS, config_class

    shared = {"device", "batch_size", "memory_budget_mb"}
    for name in PROPOSERS:
        fields = execution_only_fields(config_class(name))
        assert shared <= fields and fields <= shared | {"channels_last"}, name
    assert execution_only_fields(config_class("deepmask")) == shared | {"channels_last"}


def test_errors_name_field_value_and_allowed_values():
    path = str(GENERATE[0])
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path, [FILL, "model.name=sharpmask-zooom"])
    msg = str(err.value)
    assert "model.name" in msg and "sharpmask-zooom" in msg and "'sharpmask-zoom'" in msg
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path, [FILL, "output.formats=[coco-json, csv]"])
    assert "output.formats" in str(err.value) and "csv" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path, [FILL, "output.chunk_size=0"])
    assert "output.chunk_size" in str(err.value) and "0" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path, [FILL, "resources.gpu_per_worker=1"])
    assert "resources.gpu_per_worker" in str(err.value) and "unknown field" in str(err.value)


def test_unknown_fields_get_the_nearest_name_and_errors_name_no_internal_classes():
    path = str(GENERATE[0])  # a DeepMask/SharpMask preset

    def error(*sets: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_config(JobConfig, path, [FILL, *sets])
        return str(err.value)

    assert "output.chunk_sise: unknown field; did you mean 'chunk_size'? (got 3)" in \
        error("output.chunk_sise=3")
    assert "resources.num_workrs: unknown field; did you mean 'num_workers'?" in \
        error("resources.num_workrs=2")
    assert "model.scales.mn: unknown field; did you mean 'min'?" in error("model.scales.mn=1")
    assert "model.scalez: not a setting of the DeepMask/SharpMask family (model.name " \
           "'deepmask-zoom'); did you mean 'scales'? its settings: name," in error("model.scalez=1")
    # nothing near: the section's fields instead
    assert (f"output.colour: unknown field; the section's fields: "
            f"{', '.join(OutputConfig.model_fields)} (got 'red')") in error("output.colour=red")
    # a value where a section goes, a word where a list goes: said in the config's own terms
    for sets, line in (
            (["output=s3://b/x"], "output: must be a section of settings (key: value lines), "
                                  "not a single value (got 's3://b/x')"),
            (["model.scales=2"], "model.scales: must be a section of settings (key: value lines)"),
            (["model.name=sliding-window", "model.weights=null", "model.sizes=big"],
             "model.sizes: must be a list (got 'big')"),
            (["model.weights=3"], "model.weights: must be a string or null (got 3)")):
        msg = error(*sets)
        assert line in msg, msg
        assert "Config" not in msg and "instance of" not in msg and "tuple" not in msg, msg


def test_overrides_apply_before_validation():
    cfg = load_config(JobConfig, str(GENERATE[0]), [
        FILL, "output.chunk_size=7", "resources.gpus_per_worker=0.25", "model.scales.max=0.5",
        "output.formats=[parquet]", "dataset.limit=100"])
    assert cfg.output.chunk_size == 7 and cfg.resources.gpus_per_worker == 0.25
    assert cfg.model.scales.max == 0.5 and cfg.output.formats == ["parquet"]
    assert cfg.dataset.limit == 100


def test_secrets_never_reach_the_run_record_or_manifest():
    cfg = load_config(JobConfig, str(GENERATE[0]), [
        FILL, "output.storage_options={key: AKIAEXAMPLEKEY, secret: s3cr3t-value, "
              "client_kwargs: {endpoint_url: 'http://minio:9000'}}",
        "dataset.storage_options={token: gcs-t0ken}"])
    pub = public_dict(cfg)
    assert pub["output"]["storage_options"]["key"] == "***"
    assert pub["output"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://minio:9000"
    run_record = state.RunRecord(fingerprint="x", settings=state.output_settings(cfg)).to_json().decode()
    manifest = json.dumps(build_manifest(config=pub, model={}, dataset={}, chunk_size=1, n_chunks=0,
                                         records={}, failed_chunks=[], timings={}))
    for text in (json.dumps(pub), run_record, manifest):
        for secret in ("AKIAEXAMPLEKEY", "s3cr3t-value", "gcs-t0ken"):
            assert secret not in text


def test_output_fingerprint_ignores_execution_settings_only():
    base = load_config(JobConfig, str(GENERATE[0]), [FILL])
    fp = state.fingerprint(state.output_settings(base))
    same = load_config(JobConfig, str(GENERATE[0]), [
        "output.uri=s3://elsewhere/x", "model.batch_size=8", "model.device=cpu",
        "resources.num_workers=3", "output.storage_options={key: k}"])
    assert state.fingerprint(state.output_settings(same)) == fp
    for change in ("model.proposals=500", "output.chunk_size=100", "model.precision=bf16",
                   "dataset.limit=10", "output.gzip=false"):
        other = load_config(JobConfig, str(GENERATE[0]), [FILL, change])
        assert state.fingerprint(state.output_settings(other)) != fp, change


# -- cluster/ ------------------------------------------------------------------------------------

def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def test_aws_launcher_config():
    c = _load("aws-gpu.yaml")
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types",
                "head_node_type", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in c, key
    assert c["provider"]["type"] == "aws" and c["provider"]["region"]
    assert c["auth"]["ssh_user"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    workers = [t for n, t in types.items() if n != c["head_node_type"]]
    gpu = [t for t in workers if t["node_config"]["InstanceType"].split(".")[0][0] in "gp"]
    assert gpu and all(t["max_workers"] >= t["min_workers"] for t in gpu)
    assert sum(t["max_workers"] for t in workers) <= c["max_workers"]
    head_start = " ".join(c["head_start_ray_commands"])
    assert "--head" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start  # the Jobs API is not public
    assert "RAY_AUTH_MODE=token" in " ".join(c["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in c["file_mounts"]  # one token on every node


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # no public dashboard/Jobs API
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g["template"]))]
    assert gpu_groups
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert "rayStartParams" in g
    for template in [head["template"]] + [g["template"] for g in groups]:
        for c in _containers(template):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # not inline


def test_kuberay_raycluster():
    c = _load("kuberay/raycluster.yaml")
    assert c["apiVersion"] == "ray.io/v1" and c["kind"] == "RayCluster"
    _check_ray_cluster_spec(c["spec"])


def test_kuberay_rayjob():
    c = _load("kuberay/rayjob.yaml")
    assert c["apiVersion"] == "ray.io/v1" and c["kind"] == "RayJob"
    spec = c["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                "backoffLimit"):
        assert key in spec
    words = spec["entrypoint"].split()
    assert words[:2] == ["python", "jobs/generate.py"] and (ROOT / words[1]).is_file()
    assert (ROOT / words[2]).is_file()
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    # The entrypoint's config, with its overrides, is a valid run config.
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    with pytest.raises(ConfigError, match="placeholder"):
        load_config(JobConfig, str(ROOT / words[2]), overrides)
    load_config(JobConfig, str(ROOT / words[2]), overrides + [FILL])

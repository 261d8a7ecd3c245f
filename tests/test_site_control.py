"""A hospital runs only what it installed and decides which studies it joins (no NVFlare processes).

The kits fedseg makes refuse custom code and allow only the classes fedseg's jobs name; a site's
policy refuses a job with the rule named; the approve list pins a job's exact configuration; and
every decision lands in the site's audit log. The deployment that proves all of it on real kits is
tests/test_provisioning.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from conftest import component_paths, tiny_job
from fedseg.app.site_policy import (
    JobFacts,
    PolicyError,
    SitePolicy,
    append_audit,
    approve,
    approved_fingerprints,
    config_fingerprint,
    decide,
    policy_of,
    read_audit,
)


def _facts(**changes) -> JobFacts:
    base = dict(name="study", algorithm="fedavg", network="unet", rounds=50, local_epochs=1,
                modalities=("t1", "t1ce", "t2", "flair"), wandb="off", privacy_filter=False, fingerprint="ab" * 32,
                declared_rounds=50, server_seen=True)
    return JobFacts(**{**base, **changes})


def test_each_rule_names_what_the_site_accepts_and_what_the_job_asks():
    policy = SitePolicy(algorithms=("fedavg", "fedper"), networks=("unet",), max_rounds=100, max_local_epochs=2,
                        modalities=("t1ce", "flair"), require_privacy_filter=True, allow_wandb=False)
    assert policy.refusals(_facts(modalities=("t1ce", "flair"), privacy_filter=True)) == []
    refusals = policy.refusals(_facts(algorithm="ditto", network="segresnet", rounds=200, local_epochs=3,
                                      wandb="online"))
    assert refusals == [
        "accepts the algorithms fedavg, fedper; the job runs ditto",
        "accepts the networks unet; the job trains segresnet",
        "accepts at most 100 rounds; the job asks 200",
        "accepts at most 2 local epochs; the job asks 3",
        "reads only t1ce, flair; the job asks for t1, t2 too",
        "requires a privacy filter on every update it sends; the job has none",
        "does not allow its metrics in Weights & Biases; the job tracks to W&B (online)",
    ]
    assert SitePolicy().refusals(_facts(rounds=10_000, wandb="online")) == []  # no rule: anything goes


def test_a_job_of_another_fedseg_version_is_refused_naming_both_versions():
    decision = decide(None, _facts(), job_version="0.0.9", site_version="0.1.0")
    assert not decision.accepted
    assert decision.reason == "runs fedseg 0.1.0; the job was built for fedseg 0.0.9"
    assert decide(None, _facts(), job_version="0.1.0", site_version="0.1.0").accepted


@pytest.mark.parametrize("doc, problem", [
    ({"max_rounds": 0}, "'max_rounds' must be a whole number >= 1"),
    ({"max_rounds": True}, "'max_rounds' must be a whole number >= 1"),
    ({"algorithms": "fedavg"}, "'algorithms' must be a list of names"),
    ({"allow_wandb": "no"}, "'allow_wandb' must be true or false"),
    ({"max_round": 3}, "unknown policy key(s) max_round"),
    (["fedavg"], "'policy' must be an object"),
])
def test_a_malformed_policy_names_the_file_and_the_key(tmp_path, doc, problem):
    from fedseg.app.site_config import SiteConfig, write_site_config

    path = write_site_config(tmp_path / "fedseg_site.json", tmp_path / "site.json", policy=doc)
    with pytest.raises(PolicyError) as err:
        policy_of(SiteConfig.from_file(path))
    assert str(path) in str(err.value) and problem in str(err.value)


def test_approval_pins_the_exact_client_config_and_the_lists_are_owner_only(tmp_path):
    from fedseg.jobs.base import export

    folder = export(tiny_job(name="study"), tmp_path / "jobs")
    config = tmp_path / "local" / "fedseg_site.json"
    config.parent.mkdir()
    config.write_text("{}")
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    facts = JobFacts.from_job(client["executors"][0]["executor"]["args"]["job"], client, server)
    policy = SitePolicy(require_approval=True)
    refused = decide(policy, facts, approved_fingerprints(config), job_version="1", site_version="1")
    assert not refused.accepted and "runs only approved jobs" in refused.reason
    [(app, fingerprint)] = approve(config, folder)
    assert app == "app" and fingerprint == facts.fingerprint == config_fingerprint(client, server)
    assert decide(policy, facts, approved_fingerprints(config), job_version="1", site_version="1").accepted
    listing = config.with_name("fedseg_site.approved.json")
    assert stat.S_IMODE(listing.stat().st_mode) == 0o600
    # one changed setting (a round more) is another job: not approved
    client["executors"][0]["executor"]["args"]["job"]["study"]["federation"]["rounds"] += 1
    changed = JobFacts.from_job(client["executors"][0]["executor"]["args"]["job"], client, server)
    assert changed.fingerprint != facts.fingerprint
    assert not decide(policy, changed, approved_fingerprints(config), job_version="1", site_version="1").accepted
    # so is the server's side of the job: more rounds on the server than the sites were told
    document = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    server["workflows"][0]["args"]["num_rounds"] = 200
    longer = JobFacts.from_job(document["executors"][0]["executor"]["args"]["job"], document, server)
    assert longer.fingerprint != facts.fingerprint and longer.rounds == 200
    refused = decide(None, longer, (), job_version="1", site_version="1")
    assert "the job's server runs 200 rounds but the job tells the sites 2" in refused.reason
    with pytest.raises(PolicyError, match="not a job folder"):
        approve(config, tmp_path)


def test_the_rules_are_checked_against_what_will_run_not_what_the_job_declares(tmp_path):
    """The privacy filter must cover the train task; a setting left out of the job is the default the
    site trains with; the W&B receiver is read from the server config the site was deployed with."""
    from fedseg.jobs.addons import Addons, PrivacyFilter
    from fedseg.jobs.base import export
    from fedseg.jobs.stats import export_stats

    def facts_of(folder, edit_client=None, edit_document=None):
        client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
        server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
        (edit_client or (lambda c: None))(client)
        document = client["executors"][0]["executor"]["args"]["job"] if client["executors"][0]["executor"]["args"].get("job") else {}
        (edit_document or (lambda d: None))(document)
        return JobFacts.from_job(document, client, server)

    plain = export(tiny_job(name="plain"), tmp_path)
    svt = export(tiny_job(name="svt", addons=Addons(privacy=PrivacyFilter("svt"))), tmp_path)
    assert facts_of(plain).privacy_filter is False and facts_of(svt).privacy_filter is True

    def filter_on_another_task(client):
        for entry in client["task_result_filters"]:
            entry["tasks"] = ["never"]

    assert facts_of(svt, edit_client=filter_on_another_task).privacy_filter is False

    def drop_settings(document):
        del document["study"]["data"], document["study"]["model"]

    bare = facts_of(plain, edit_document=drop_settings)
    assert bare.modalities == ("t1", "t1ce", "t2", "flair") and bare.network == "unet"  # the site's defaults
    policy = SitePolicy(modalities=("t1", "t2"), networks=("segresnet",))
    assert len(policy.refusals(bare)) == 2
    # W&B: the job says "off", the server it was deployed with runs a receiver
    tracked = export(tiny_job(name="tracked", addons=Addons(wandb="offline")), tmp_path)
    assert facts_of(tracked, edit_document=lambda d: d.update(wandb="off")).wandb != "off"
    # statistics: NVFlare's statistics privacy filter on the fed_stats results
    stats = export_stats(tmp_path)
    client = json.loads((stats / "app" / "config" / "config_fed_client.json").read_text())
    document = {"algorithm": "stats", "study_name": "stats", "study": {"data": {"modalities": ["t1"]}}}
    assert JobFacts.from_job(document, client, None).privacy_filter is True
    client["task_result_filters"] = []
    assert JobFacts.from_job(document, client, None).privacy_filter is False


def test_a_site_with_a_policy_refuses_what_it_cannot_check():
    unseen = _facts(server_seen=False)
    assert "checks the server's configuration" in decide(SitePolicy(), unseen, job_version="1", site_version="1").reason
    assert decide(None, unseen, job_version="1", site_version="1").accepted  # no policy: nothing to check
    unreadable = _facts(unreadable="ValueError: bad rounds")
    assert "cannot read the job's settings" in decide(None, unreadable, job_version="1", site_version="1").reason


def test_the_audit_log_appends_one_owner_only_line_per_decision(tmp_path):
    config = tmp_path / "fedseg_site.json"
    append_audit(config, {"job_id": "j1", "decision": "accepted", "reason": ""})
    append_audit(config, {"job_id": "j2", "decision": "refused", "reason": "accepts at most 1 rounds; the job asks 2"})
    records = read_audit(config)
    assert [(r["job_id"], r["decision"]) for r in records] == [("j1", "accepted"), ("j2", "refused")]
    assert all(r["time"].endswith("Z") for r in records)
    assert stat.S_IMODE(config.with_name("fedseg_site.audit.jsonl").stat().st_mode) == 0o600


def test_the_allow_list_is_exactly_the_classes_fedseg_jobs_name(tmp_path):
    """Every algorithm with every add-on, and the statistics job: the fedseg classes they name are
    FEDSEG_JOB_CLASSES, and every other class is NVFlare's default list or EXTRA_JOB_CLASSES."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    from fedseg.jobs.addons import Addons, ContributionWeights, PrivacyFilter, SiteGroups
    from fedseg.jobs.base import Job, algorithms, export
    from fedseg.jobs.stats import export_stats
    from fedseg.provisioning.site_control import (
        EXTRA_JOB_CLASSES,
        FEDSEG_JOB_CLASSES,
        SITE_JOB_CLASSES,
        class_allow_list,
    )

    variants = [Addons(wandb="offline", quantize="int8"), Addons(quantize="fp16"), Addons(privacy=PrivacyFilter("svt")),
                Addons(privacy=PrivacyFilter("percentile")), Addons(contribution=ContributionWeights()),
                Addons(groups=SiteGroups())]
    folders, exported = [export_stats(tmp_path)], set()
    for algorithm in algorithms():
        for i, addons in enumerate([Addons(), *variants]):
            try:
                job = tiny_job(algorithm=algorithm, addons=addons, name=f"{algorithm}_{i}".replace("-", "_"),
                               local_epochs=2)
            except ValueError:  # an add-on the algorithm does not support
                continue
            folders.append(export(job, tmp_path))
            exported.add(algorithm)
    named = {p for folder in folders for config in folder.rglob("*.json") for p in component_paths(json.loads(config.read_text()))}
    assert {p for p in named if p.startswith("fedseg.")} == set(FEDSEG_JOB_CLASSES)
    others = {p for p in named if not p.startswith("fedseg.")}
    assert others - set(DEFAULT_CLASS_ALLOW_LIST) <= set(EXTRA_JOB_CLASSES)
    assert named <= set(class_allow_list())
    site_named = {p for folder in folders for p in component_paths(json.loads((folder / "app" / "config" / "config_fed_client.json").read_text()))}
    assert site_named == set(SITE_JOB_CLASSES)  # a hospital allows exactly what fedseg's site configs name
    assert not any(folder.joinpath("app", "custom").exists() for folder in folders)
    assert exported == set(algorithms())


def test_fedseg_kits_refuse_custom_code_to_every_role_and_enforce_the_allow_list(tmp_path):
    from fedseg.provisioning.consortium import parse_consortium
    from fedseg.provisioning.kits import provision
    from fedseg.provisioning.site_control import SITE_JOB_CLASSES, class_allow_list, is_locked_down

    from test_provisioning import _consortium_doc

    kits = provision(parse_consortium(_consortium_doc()), tmp_path / "kits")
    for kit in (kits.server_kit, *map(kits.hospital_kit, ("hospital-a", "hospital-b"))):
        assert is_locked_down(kit), kit
        auth = json.loads((kit / "local" / "authorization.json").read_text())
        assert {role: rights["byoc"] for role, rights in auth["permissions"].items()} == {
            "project_admin": "none", "org_admin": "none", "lead": "none", "member": "none"}
        # the project admin keeps every other right NVFlare's "any" gave it
        assert auth["permissions"]["project_admin"]["submit_job"] == "any"
        resources = json.loads((kit / "local" / "resources.json").read_text())
        if kit == kits.server_kit:
            assert resources["class_allow_list"] == class_allow_list()
        else:  # a hospital: what fedseg's site configs name, and the kit's own components
            own = {c["path"] for c in resources["components"]}
            assert set(resources["class_allow_list"]) == set(SITE_JOB_CLASSES) | own
            assert "nvflare.app_common.executors.psi.psi_executor.PSIExecutor" not in resources["class_allow_list"]
    # the server's storage survives the lock-down (both live in local/resources.json)
    server = json.loads((kits.server_kit / "local" / "resources.json").read_text())
    assert "storage" in json.dumps(server["snapshot_persistor"])


def test_site_config_writes_the_default_policy_and_keeps_an_admins_edits(tmp_path, capsys):
    from fedseg.app.site_config import load_site_config
    from fedseg.cli import main
    from fedseg.provisioning.consortium import parse_consortium
    from fedseg.provisioning.kits import provision
    from fedseg.provisioning.site_control import default_site_policy

    from test_provisioning import _consortium_doc

    kit = provision(parse_consortium(_consortium_doc()), tmp_path / "kits").hospital_kit("hospital-a")
    datalist = tmp_path / "site.json"
    datalist.write_text("{}")
    assert main(["provision", "site-config", str(kit), "--datalist", str(datalist)]) == 0
    path = kit / "local" / "fedseg_site.json"
    assert policy_of(load_site_config("hospital-a", path)) == default_site_policy()
    assert "stats" in default_site_policy().algorithms and not default_site_policy().allow_wandb
    doc = json.loads(path.read_text())
    doc["policy"]["max_rounds"] = 30  # the admin's edit
    path.write_text(json.dumps(doc))
    assert main(["provision", "site-config", str(kit), "--datalist", str(datalist), "--require-approval"]) == 0
    policy = policy_of(load_site_config("hospital-a", path))
    assert policy.max_rounds == 30 and policy.require_approval
    capsys.readouterr()
    assert main(["site", "audit", "--kit", str(kit)]) == 0
    assert "no decisions yet" in capsys.readouterr().out
    assert main(["site", "approve", str(tmp_path), "--kit", str(kit)]) == 2
    assert "not a job folder" in capsys.readouterr().err

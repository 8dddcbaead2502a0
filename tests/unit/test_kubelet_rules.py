"""The test kubelet's pure rules: ``$(VAR)`` expansion as Kubernetes does it, mount paths
rewritten to the local folders that stand for them, and one ReplicaSet per pod template."""

# ruff: noqa: S108 - paths as a pod sees them, never opened here

from __future__ import annotations

from tests.kube.kubelet import expand, path_mapper, template_hash


def test_references_to_defined_variables_are_expanded_and_others_left_as_written() -> None:
    env = {"RANK": "1", "NAME": "train"}
    assert expand("$(NAME)-$(RANK)", env) == "train-1"
    assert expand("$(MISSING) stays", env) == "$(MISSING) stays"
    assert expand("$$(NAME) is escaped", env) == "$(NAME) is escaped"
    assert (
        expand("$NAME and ${NAME} are not references", env)
        == "$NAME and ${NAME} are not references"
    )


def test_a_mount_path_becomes_its_folder_wherever_it_starts_a_path() -> None:
    mapped = path_mapper({"/storage": "/local/claim", "/tmp": "/local/pod/tmp"})
    assert mapped("/storage") == "/local/claim"
    assert mapped("--model-dir=/storage/models/x") == "--model-dir=/local/claim/models/x"
    assert mapped("file:///storage/x") == "file:///local/claim/x"
    assert mapped('{"root": "/storage", "scratch": "/tmp/x"}') == (
        '{"root": "/local/claim", "scratch": "/local/pod/tmp/x"}'
    )


def test_only_whole_path_components_are_rewritten() -> None:
    mapped = path_mapper({"/storage": "/local/claim"})
    assert mapped("/storage2/x") == "/storage2/x"
    assert mapped("/data/storage/x") == "/data/storage/x"


def test_the_longest_mount_wins_so_a_claim_under_tmp_stays_the_claim() -> None:
    mapped = path_mapper({"/tmp": "/pod/tmp", "/tmp/run/storage": "/tmp/run/storage"})
    assert mapped("/tmp/run/storage/models") == "/tmp/run/storage/models"
    assert mapped("/tmp/run/other") == "/pod/tmp/run/other"


def test_no_mounts_leave_text_alone() -> None:
    assert path_mapper({})("/storage/x") == "/storage/x"


def test_the_template_hash_follows_the_template_not_the_order_of_its_keys() -> None:
    one = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": []}}
    same = {"spec": {"containers": []}, "metadata": {"labels": {"b": "2", "a": "1"}}}
    other = {"metadata": {"labels": {"a": "1", "b": "3"}}, "spec": {"containers": []}}
    assert template_hash(one) == template_hash(same)
    assert template_hash(one) != template_hash(other)
    assert len(template_hash(one)) == 10

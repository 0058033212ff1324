"""The variants of the generated project and the files each one has: the one map of them.

A variant is a supported combination of the answers that change which files a project
gets; ``cookiecutter.json`` names it as ``__variant``. ``post_gen_project`` removes
the files of the other variants, and the template's tests render every variant and
check its files against this same map. A file not named here belongs to every variant.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Each variant and the answers that make it.
VARIANTS: Mapping[str, Mapping[str, str]] = {
    "source-poll": {"connector_type": "source", "source_style": "poll"},
    "source-webhook": {"connector_type": "source", "source_style": "webhook"},
    "sink": {"connector_type": "sink"},
}
SOURCES = frozenset({"source-poll", "source-webhook"})
#: The variants that serve HTTP on ``port`` (and so get a Service and a HEALTHCHECK).
SERVES_HTTP = frozenset({"sink", "source-webhook"})

#: Files that exist only in some variants (paths relative to the project root).
ONLY_IN: Mapping[str, frozenset[str]] = {
    "internal/source.py": SOURCES,
    "internal/sink.py": frozenset({"sink"}),
    "deploy/kubernetes/service.yaml": SERVES_HTTP,
    "deploy/kubernetes/state.yaml": frozenset({"source-poll"}),
    # A PodDisruptionBudget only beside a Deployment of more than one replica.
    "deploy/kubernetes/pdb.yaml": SERVES_HTTP,
    "deploy/kubernetes-etcd/pdb.yaml": frozenset({"source-poll"}),
    "deploy/kubernetes-etcd/configmap.yaml": frozenset({"source-poll"}),
    "deploy/kubernetes-etcd/deployment.yaml": frozenset({"source-poll"}),
    "deploy/knative/service.yaml": frozenset({"sink"}),
    "deploy/knative/sinkbinding.yaml": SOURCES,
    "tests/test_source.py": frozenset({"source-poll"}),
    "tests/test_webhook.py": frozenset({"source-webhook"}),
    "tests/test_sink.py": frozenset({"sink"}),
}


def files_to_remove(variant: str, only_in: Mapping[str, frozenset[str]] = ONLY_IN) -> list[str]:
    """The paths that do not belong to ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    return sorted(path for path, variants in only_in.items() if variant not in variants)

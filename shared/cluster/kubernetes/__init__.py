"""The Kubernetes backends (kubernetes-asyncio): training as an Indexed Job with a headless
Service, serving as a Deployment with a Service per model.

:mod:`.manifests` and :mod:`.outcome` are pure (objects in, objects out); :mod:`.api` is the only
module that talks to the API server. Services import this package lazily, when their settings
choose ``kubernetes``.
"""

"""Prefect flows: thin orchestration over the plain functions of preprocessing/, storage/, xmask3d/.

Deployments (prefect.yaml): ``preprocess/<dataset>``, ``train/<benchmark>``,
``evaluate/<benchmark>`` and the scheduled ``retrain/<benchmark>``. Modules are imported one by one
(``flows.preprocess`` ...), so importing this package stays cheap.
"""

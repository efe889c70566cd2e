"""Prefect flows: thin orchestration over the plain functions of preprocessing/, storage/, xmask3d/.

Deployments (prefect.yaml): ``preprocess/<dataset>``, ``train/<benchmark>``,
``evaluate/<benchmark>`` and the scheduled ``retrain/<benchmark>``. Modules are imported one by one
(``flows.preprocess`` ...), so importing this package stays cheap.
"""

from xmask3d.engine.progress import quiet_library_noise

# Deployments run these modules in a worker's process: library chatter off there too (Dask's
# INFO lines, MLflow's set-up lines, progress bars in non-terminal logs); see xmask3d.engine.progress.
quiet_library_noise()

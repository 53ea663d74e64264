"""GPU telemetry: NVML sampling, the Prometheus exporter, energy accounting, power caps.

Modules (none imports Ray or torch; jobs may import any of them except `energy`, which
touches the ledger):

    sampler.py      NvmlSampler(nvml): one NodeSample of every GPU; every NVML failure handled
    nvml.py         loading pynvml, naming NVML errors, reading field values
    fake_nvml.py    FakeNvml: a stateful stand-in for `pynvml` where no GPU exists
    exporter.py     TelemetryExporter: llmctl_gpu_* metrics, one per node (`llmctl telemetry serve`)
    assignments.py  which GPUs belong to which run (files the exporter reads to label run_id)
    meter.py        EnergyMeter: a worker measures its GPUs' energy into the run directory
    power.py        apply_power_policy(RunSpec.power, ...) -> handle; handle.restore()
    health.py       XID / uncorrectable ECC / lost GPU -> <storage>/telemetry/health/<node>.json
    energy.py       the per-run energy ledger: kWh, J/token, W per GPU, facility kWh, kg CO2e
    worker.py       start_worker_telemetry(...): the four steps below in one call, and tel.stop()

What a training job does on each worker (`worker.start_worker_telemetry` does exactly this;
all of it is a no-op without a GPU):

    from controlplane.telemetry.assignments import assign_gpus, cuda_visible_gpus
    from controlplane.telemetry.meter import EnergyMeter
    from controlplane.telemetry.power import apply_power_policy
    from controlplane.telemetry.sampler import NvmlSampler

    with NvmlSampler(watch_events=False) as s:            # NVML indices and UUIDs of this worker
        mine = cuda_visible_gpus(s.identities()) if s.status == "ok" else []
    storage = cluster.storage_root()
    assignment = assign_gpus(storage, node, run_id, mine, attempt=attempt)   # the exporter labels run_id
    power = apply_power_policy(run.power, [i for i, _ in mine], measure=run_calibration_steps,
                               run_dir=run_dir, attempt=attempt, node=node)   # cap or calibrate
    meter = EnergyMeter(run_dir, attempt, node, [i for i, _ in mine], assignment=assignment).start()
    try:
        ...train...
    finally:
        meter.stop(); power.restore(); assignment.release()

`node` is the node's name as its exporter knows it (`llmctl telemetry serve --node`, default
the host name, `assignments.default_node_name()`). `llmctl run energy RUN` then turns the run directory's files into the ledger's
`run_energy` row.
"""

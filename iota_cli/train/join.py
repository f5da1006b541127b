"""Joining a swarm: preflight checks, identity, assignment, weights (or a checkpoint), then the loop.

`iota join` calls join(); `iota swarm` starts that same command in worker processes. Nothing here is
special-cased for a local swarm.

The order decides what a mistake looks like: an unknown backend is a configuration error (78) before any
hardware check; a machine that fails the doctor's checks stops (1) unless --force; an orchestrator that
does not answer as one on first contact stops within first_contact_s (69, the doctor's words), while
one this machine has trained with (it has a checkpoint) is waited for as long as it takes. Try it:
    IOTA_FIRST_CONTACT_S=3 iota join --orchestrator http://127.0.0.1:1 --backend torch-cpu --force
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from iota_cli import output
from iota_cli.config.settings import Paths
from iota_cli.core.backend import BackendFactory, StageBackend, StageInputError
from iota_cli.core.manifest import RunManifest
from iota_cli.core.modelspec import forward_flops_per_token, stage_spec
from iota_cli.core.protocol import PROTOCOL_VERSION, Assignment, AssignmentRequest, BlobRef, RegisterRequest
from iota_cli.core.tensors import RawTensor, TensorDict, TensorFormatError, decode
from iota_cli.machine.hardware import HardwareReport
from iota_cli.machine.requirements import Check
from iota_cli.train.api import SwarmApi
from iota_cli.train.checkpoint import CheckpointStore, LoopState, manifest_fingerprint
from iota_cli.train.client import Client
from iota_cli.train.errors import ApiError, IntegrityError, Stopped, Unreachable
from iota_cli.train.patience import Backoff

log = logging.getLogger("iota.join")


@dataclass(frozen=True)
class JoinOptions:
    orchestrator: str
    backend: str = "auto"
    run_id: str | None = None
    max_steps: int | None = None
    fresh: bool = False
    force: bool = False
    allow_battery: bool = False
    name: str = ""
    token: str | None = None
    stage: int | None = None  # a preferred stage; the orchestrator may place us elsewhere
    max_memory_gb: float = 0.0  # cap on the memory a stage may use (0: what the device has)
    invite: str = ""  # the operator's invite (IOTA_INVITE), for an orchestrator that requires one
    first_contact_s: float = 20.0  # how long a first join tries an orchestrator that does not answer


class JoinError(output.Failure):
    """Joining cannot go on; code is the exit status (output.EXIT_*)."""


def preflight(paths: Paths, backend: str) -> tuple[HardwareReport, list[Check]]:
    """Probe once; the doctor's checks that fail here for this backend (joining checks the network)."""
    from iota_cli.machine import hardware, requirements

    report = hardware.probe(data_dir=paths.data_dir, backend=backend)
    return report, [c for c in requirements.check(report) if c.status == "fail"]


def memory_budget(report: HardwareReport, factory_name: str, cap_gb: float, overhead: int = 0) -> int:
    """Bytes a stage may use on this device: the GPU's VRAM for CUDA, RAM otherwise (0: unknown), less what
    the framework itself holds there (overhead), so it compares with the model spec's estimate."""
    if factory_name == "torch-cuda" and report.gpus:
        found = max(g.vram_bytes or 0 for g in report.gpus)
    elif factory_name in ("mlx", "torch-mps"):
        found = int((report.ram_bytes or 0) * 0.75)  # unified memory: leave the OS its share
    else:
        found = report.ram_bytes or 0
    cap = int(cap_gb * 1024**3)
    budget = min(found, cap) if cap and found else (cap or found)
    return max(budget - overhead, 1) if budget else 0


def measure_throughput(factory: BackendFactory, manifest: RunManifest, repeats: int = 2) -> float:
    """GFLOP/s of a head-stage forward+backward at the run's batch shape (what assignment balances)."""
    import random

    cfg, train = manifest.model, manifest.train
    stage = factory.create(cfg, 0, manifest.optim, seed=manifest.seed)
    b, t = train.batch_size, train.seq_len
    rng = random.Random(0)
    ids = [rng.randrange(cfg.vocab_size) for _ in range(b * t)]
    tokens = RawTensor("I32", (b, t), b"".join(i.to_bytes(4, "little") for i in ids))
    flops = 3 * forward_flops_per_token(cfg, stage_spec(cfg, 0)) * b * t
    stage.forward("warmup", {"tokens": tokens})
    stage.free("warmup")
    start = time.perf_counter()
    for i in range(repeats):
        stage.forward(f"m{i}", {"tokens": tokens})
        grad = RawTensor("F32", (b, t, cfg.bottleneck_dim), bytes(4 * b * t * cfg.bottleneck_dim))
        stage.backward(f"m{i}", {"grad": grad})
    return flops * repeats / max(time.perf_counter() - start, 1e-6) / 1e9


def check_backend(name: str) -> None:
    """An explicit backend must exist and run here: a configuration error (78) that names the ones that
    do, before the doctor's hardware checks would bury it under "gpu (none)". "auto" is the doctor's."""
    from iota_cli.core.backend import factories

    if name in ("", "auto"):
        return
    found = factories()
    if name not in found:
        raise JoinError(
            f"unknown backend {name!r} (known: auto, {', '.join(sorted(found)) or 'none installed'})",
            code=output.EXIT_CONFIG,
            hint="pass --backend with one of those (`iota backends` says which run here)",
        )
    ok, why = found[name].available()
    if not ok:
        usable = [n for n, f in sorted(found.items()) if n != name and f.available()[0]]
        raise JoinError(
            f"backend {name!r} is not available here: {why} (available: {', '.join(usable) or 'none'})",
            code=output.EXIT_CONFIG,
            hint="pass --backend with an available one, or see `iota backends` for what is missing",
        )


def has_joined(data_dir: Path) -> bool:
    """Whether this machine has trained a stage before (it has a checkpoint): then an orchestrator that
    does not answer is away for a while and is waited for; before that, it is more likely a wrong URL."""
    from iota_cli.train.status import local_checkpoints

    return bool(local_checkpoints(data_dir))


def first_contact(api: SwarmApi, report: HardwareReport, within_s: float, stop: threading.Event) -> None:
    """Ask /v1/health for up to within_s; JoinError (69, with the doctor's network check) if no iota
    orchestrator answers: nothing listens, the host is unknown, or another server answers there."""
    from iota_cli.machine.readiness import NetworkStatus
    from iota_cli.machine.requirements import check_network

    deadline, backoff = time.monotonic() + within_s, Backoff(1.0, 8.0)
    while True:
        try:
            api.health()
            return
        except ApiError as e:
            # Another web server, or a proxy's error page: its body is HTML, not worth showing.
            said = f"HTTP {e.status}" if e.status >= 400 else f"no protocol v{PROTOCOL_VERSION} health"
            detail = f"answers {said} on /v1/health: not an iota orchestrator"
            break
        except Unreachable as e:
            left = deadline - time.monotonic()
            detail = f"{e}, tried for {within_s:g} s"
            if left <= 0:
                break
            delay = min(backoff.next(), left)
            log.warning("%s, retrying in %.1f s (first contact: giving up after %g s)", e, delay, within_s)
            if stop.wait(delay):
                raise Stopped(f"{e} (stopping)") from None
    url = api.client.base_url.rstrip("/")
    check = check_network(replace(report, network=NetworkStatus(url, False, None, detail)))
    raise JoinError(f"cannot join {check.found}", code=output.EXIT_UNAVAILABLE, hint=check.hint)


def ensure_token(api: SwarmApi, opts: JoinOptions, backend: str) -> str:
    """Use the configured token, or register a new contributor and keep its token where the next
    `iota join` finds it (the OS keyring, else a 0600 file: config/credentials.py)."""
    from iota_cli.config import credentials

    try:
        source = credentials.resolve_token(opts.token, orchestrator=opts.orchestrator)
        log.info("using the token from %s", source.source)
        return source.token
    except credentials.NoToken:
        pass  # any other CredentialsError (an unsafe token file) is the user's to fix: exit 78
    name = opts.name or platform.node() or "contributor"
    reply = api.register(RegisterRequest(name=name[:64], backend=backend, invite=opts.invite))
    try:
        kept = credentials.keep_token(reply.token, orchestrator=opts.orchestrator)
        log.info("registered as %s; token kept %s", reply.contributor_id, kept.describe())
    except credentials.CredentialsError as e:
        log.warning(
            "registered as %s, but the token is kept for this session only: %s", reply.contributor_id, e
        )
    return reply.token


def pick_run(api: SwarmApi, run_id: str | None) -> RunManifest:
    if run_id:
        return api.run(run_id).manifest
    running = [r for r in api.runs() if r.state == "running"]
    if not running:
        raise JoinError("the orchestrator has no running run", code=output.EXIT_UNAVAILABLE)
    return max(running, key=lambda r: r.created).manifest


def weights_file(cache_dir: Path, run_id: str, stage: int, ref: BlobRef) -> Path:
    """Where a stage's published weights are cached on this machine (a verified file there is a hit)."""
    return cache_dir / "weights" / run_id / f"stage-{stage}-{ref.sha256[:16]}.safetensors"


def published_weights(api: SwarmApi, cache_dir: Path, run_id: str, stage: int, ref: BlobRef) -> TensorDict:
    """A stage's published weights through the cache: IntegrityError when they keep failing their sha256,
    TensorFormatError when they are no tensor file (then dropped from the cache)."""
    path = api.download(ref, weights_file(cache_dir, run_id, stage, ref))
    try:
        return decode(path.read_bytes())[0]
    except TensorFormatError:
        path.unlink(missing_ok=True)
        raise


def epoch_base(api: SwarmApi, assignment: Assignment, state: LoopState, cache_dir: Path) -> TensorDict | None:
    """The published weights of the epoch a replica holds, which its merge updates count from (a resumed
    replica's checkpoint has trained past them); None when they cannot be had."""
    if assignment.epoch != state.epoch:
        return None
    try:
        return published_weights(api, cache_dir, assignment.run_id, assignment.stage, assignment.weights)
    except (IntegrityError, TensorFormatError) as e:
        log.warning("no epoch %d weights (%s): merge updates count from the weights held now", state.epoch, e)
        return None


def restore(
    backend: StageBackend,
    assignment: Assignment,
    store: CheckpointStore,
    api: SwarmApi,
    cache_dir: Path,
    contributor_id: str,
    backend_name: str,
) -> LoopState:
    """Resume from the local checkpoint unless the swarm merged past it; then take the swarm's weights."""
    manifest = assignment.manifest
    fingerprint = manifest_fingerprint(manifest)
    ck = store.load_latest(fingerprint=fingerprint)
    if ck is not None and ck.state.stage == assignment.stage and ck.state.epoch >= assignment.epoch:
        backend.load(ck.weights, ck.optimizer)
        log.info(
            "resuming from checkpoint %s (step %d, epoch %d)", ck.path.name, ck.state.step, ck.state.epoch
        )
        return LoopState(**{**ck.state.to_dict(), "contributor_id": contributor_id, "backend": backend_name})
    ref = assignment.weights
    dest = weights_file(cache_dir, assignment.run_id, assignment.stage, ref)
    same_stage = ck is not None and ck.state.stage == assignment.stage
    try:
        weights = published_weights(api, cache_dir, assignment.run_id, assignment.stage, ref)
        backend.load(weights, ck.optimizer if ck is not None and same_stage else None)
    except (IntegrityError, TensorFormatError, StageInputError) as e:
        dest.unlink(missing_ok=True)  # never trusted again from the cache
        raise JoinError(
            f"the orchestrator's weights for stage {assignment.stage} are unusable: {e}",
            code=output.EXIT_UNAVAILABLE,
            hint="the orchestrator's blob store may be damaged; its operator should look (retry later)",
        ) from None
    if ck is not None:
        log.info(
            "the swarm merged past checkpoint %s (step %d, epoch %d): taking its weights (epoch %d)",
            ck.path.name,
            ck.state.step,
            ck.state.epoch,
            assignment.epoch,
        )
    prior = ck.state if ck is not None and same_stage else None
    return LoopState(
        run_id=assignment.run_id,
        contributor_id=contributor_id,
        stage=assignment.stage,
        step=prior.step if prior else 0,
        backward_passes=prior.backward_passes if prior else 0,
        epoch=assignment.epoch,
        credits_seen=prior.credits_seen if prior else 0.0,
        tokens=prior.tokens if prior else 0,
        fingerprint=fingerprint,
        backend=backend_name,
    )


def join(opts: JoinOptions, paths: Paths, stop: threading.Event) -> int:
    """Join and train until stopped, max_steps, or the run's end; returns the exit status."""
    from iota_cli.core.backend import BackendError, select_backend
    from iota_cli.headless.livefile import NAME as LIVE_NAME
    from iota_cli.headless.livefile import LiveFile
    from iota_cli.headless.notify import Notifier
    from iota_cli.headless.progress import Progress
    from iota_cli.machine.power import KeepAwake, PowerGuard
    from iota_cli.train.worker import LoopOptions, Worker

    check_backend(opts.backend)
    report, failures = preflight(paths, opts.backend)
    if failures:
        names = ", ".join(f"{c.name} ({c.found})" for c in failures)
        if not opts.force:
            raise JoinError(
                f"this machine fails the doctor's checks: {names}",
                hint="run `iota doctor` for the fixes, or pass --force to join anyway",
            )
        log.warning("joining despite failed checks (--force): %s", names)
    try:
        backend_name, factory = select_backend(opts.backend)
    except BackendError as e:
        raise JoinError(str(e), code=output.EXIT_CONFIG) from None

    notifier = Notifier.from_env(unset=True)  # children (systemd-inhibit) must not notify for us
    awake = KeepAwake.for_pid()
    awake.start()
    client = Client(opts.orchestrator, stop=stop, on_wait=lambda m, s: log.warning("%s", m))
    api = SwarmApi(client)
    try:
        if not has_joined(paths.data_dir):
            first_contact(api, report, opts.first_contact_s, stop)
        client.token = ensure_token(api, opts, backend_name)
        preferred = opts.stage
        while not stop.is_set():
            manifest = pick_run(api, opts.run_id)
            notifier.extend_timeout(120)
            request = AssignmentRequest(
                run_id=opts.run_id,
                backend=backend_name,
                throughput=measure_throughput(factory, manifest),
                memory_bytes=memory_budget(report, backend_name, opts.max_memory_gb, factory.memory_overhead),
                stage=preferred,
            )
            assignment = api.assignment(request)
            me = api.me()
            run_manifest = assignment.manifest
            backend = factory.create(
                run_manifest.model, assignment.stage, run_manifest.optim, seed=run_manifest.seed
            )
            store = CheckpointStore(
                paths.data_dir / "checkpoints" / assignment.run_id / f"stage-{assignment.stage}"
            )
            if opts.fresh:
                store.discard()
            state = restore(backend, assignment, store, api, paths.cache_dir, me.contributor_id, backend_name)
            kind = stage_spec(run_manifest.model, assignment.stage).kind
            live = LiveFile(
                paths.data_dir / LIVE_NAME,
                run_id=assignment.run_id,
                stage=assignment.stage,
                kind=kind,
                backend=backend_name,
            )
            progress = Progress(
                f"stage {assignment.stage} {kind}", total=opts.max_steps, notifier=notifier, live=live
            )
            guard = PowerGuard(allow_battery=opts.allow_battery)
            # The loop pings the watchdog once per iteration: no wait in it may outlast a ping interval.
            wait = min(2.0, notifier.watchdog_s / 2) if notifier.watchdog_s else 2.0
            loop = LoopOptions(max_steps=opts.max_steps, claim_wait_s=wait, pause_poll_s=wait)
            worker = Worker(
                api, backend, assignment, state, store, paths.cache_dir, progress, notifier, guard, loop
            )
            client.on_wait = worker.show_wait
            try:
                worker.run()
            finally:
                progress.close()
                store.close()
            if not worker.reassign:
                break
            preferred = None  # the orchestrator asked us to move: let it choose
    finally:
        awake.stop()
        client.close()
    return output.EXIT_OK

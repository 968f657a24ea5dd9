"""The `infermesh dev` command group (`dev vllm`, `dev triton`, `dev dcgm`, `dev up`), `demo`.

Option parsing and error reporting only; heavy modules are imported inside each command so that
`infermesh --help` stays fast.
"""

from __future__ import annotations

import click

from infermesh.dev.profiles import DEFAULT_MODEL, PROFILES

__all__ = ["demo_command", "dev_group"]

DEFAULT_MESH_PROFILES = "h100,a100,a10"
LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def _profile_list(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROFILES]
    if not names or unknown:
        raise click.BadParameter(
            f"unknown profile(s) {', '.join(unknown) or text!r}; expected a comma list of "
            f"{', '.join(PROFILES)}",
            param_hint="--profiles",
        )
    return names


@click.group("dev")
def dev_group() -> None:
    """Development kit: emulated vLLM, Triton and dcgm-exporter servers and a local mesh."""


@dev_group.command("vllm")
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Served model name.")
@click.option(
    "--profile",
    type=click.Choice(list(PROFILES), case_sensitive=False),
    default="h100",
    show_default=True,
    help="GPU performance profile; `instant` answers at once (router overhead measurements).",
)
@click.option("--instant", is_flag=True, help="Shorthand for --profile instant.")
@click.option("--max-num-seqs", type=click.IntRange(min=1), help="Batch size limit [profile].")
@click.option("--num-gpu-blocks", type=click.IntRange(min=1), help="KV-cache blocks [profile].")
@click.option("--max-model-len", type=click.IntRange(min=16), help="Context length [8192].")
@click.option("--lora", "loras", multiple=True, help="Serve a LoRA adapter NAME (repeatable).")
@click.option(
    "--max-loras",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="LoRA adapters loaded at once; a runtime load beyond it is refused.",
)
@click.option(
    "--no-runtime-lora",
    is_flag=True,
    envvar="INFERMESH_DEV_NO_RUNTIME_LORA",
    help="Answer 404 on /v1/load_lora_adapter and /v1/unload_lora_adapter, like vLLM "
    "without VLLM_ALLOW_RUNTIME_LORA_UPDATING.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Varies the generated text.")
@click.option(
    "--default-max-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Answer length when a request sets no max_tokens (finishes with 'stop').",
)
@click.option("--no-prefix-caching", is_flag=True, help="Disable the prefix cache.")
@click.option(
    "--enable-prompt-tokens-details",
    is_flag=True,
    help="Report prefix-cache hits as usage.prompt_tokens_details.cached_tokens, as vLLM's flag "
    "of that name does.",
)
@click.option("--replica-tag", default="", help="Tag put into response ids: chatcmpl-TAG-....")
@click.option(
    "--stall-prob",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Share of generation requests held --stall-s before anything is answered (a GPU stall).",
)
@click.option(
    "--stall-s",
    type=click.FloatRange(min=0.0),
    default=2.0,
    show_default=True,
    help="Stall length.",
)
@click.option(
    "--fail-prob",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Share of generation requests answered --fail-status at once, before any body.",
)
@click.option(
    "--fail-status",
    type=click.IntRange(429, 599),
    default=500,
    show_default=True,
    help="Status of injected failures: 429 or a 5xx.",
)
@click.option("--log-level", type=LOG_LEVELS, default="warning", show_default=True)
def vllm_command(
    port: int,
    host: str,
    model: str,
    profile: str,
    instant: bool,
    max_num_seqs: int | None,
    num_gpu_blocks: int | None,
    max_model_len: int | None,
    loras: tuple[str, ...],
    max_loras: int,
    no_runtime_lora: bool,
    seed: int,
    default_max_tokens: int,
    no_prefix_caching: bool,
    enable_prompt_tokens_details: bool,
    replica_tag: str,
    stall_prob: float,
    stall_s: float,
    fail_prob: float,
    fail_status: int,
    log_level: str,
) -> None:
    """Serve an emulated vLLM OpenAI server backed by the engine performance model.

    Speaks /v1/chat/completions, /v1/completions (streamed or not), /v1/models, /health and
    /metrics with vLLM's metric names. Ready when GET /health returns 200.
    """
    from infermesh.core.logging import configure_logging
    from infermesh.dev.profiles import get_profile
    from infermesh.dev.vllm_emulator import EmulatorConfig, run_emulator

    configure_logging(log_level.lower(), "auto", component="vllm-emulator")
    if model in loras:
        raise click.BadParameter(
            "a LoRA adapter cannot share the base model's name", param_hint="--lora"
        )
    try:
        config = EmulatorConfig(
            model=model,
            profile=get_profile("instant" if instant else profile),
            max_num_seqs=max_num_seqs,
            num_gpu_blocks=num_gpu_blocks,
            max_model_len=max_model_len,
            loras=tuple(dict.fromkeys(loras)),
            max_loras=max_loras,
            runtime_lora_updating=not no_runtime_lora,
            seed=seed,
            replica_tag=replica_tag,
            default_max_tokens=default_max_tokens,
            enable_prefix_caching=not no_prefix_caching,
            enable_prompt_tokens_details=enable_prompt_tokens_details,
            stall_prob=stall_prob,
            stall_s=stall_s,
            fail_prob=fail_prob,
            fail_status=fail_status,
        )
        config.engine_config()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        run_emulator(config, host, port)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


@dev_group.command("triton")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--load-model",
    "models",
    multiple=True,
    help="Model loaded at start (repeatable); default: every model of the repository.",
)
@click.option(
    "--profile",
    type=click.Choice(list(PROFILES), case_sensitive=False),
    default="h100",
    show_default=True,
    help="GPU performance profile; `instant` is a CPU-only server answering at once.",
)
@click.option(
    "--model-control-mode",
    type=click.Choice(["explicit", "none"], case_sensitive=False),
    default="explicit",
    show_default=True,
    help="`none` refuses repository load/unload, as Triton does.",
)
@click.option("--instance-count", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--gpu-uuid", default="", help="UUID of the emulated GPU [derived from --seed].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-level", type=LOG_LEVELS, default="warning", show_default=True)
def triton_command(
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    host: str,
    models: tuple[str, ...],
    profile: str,
    model_control_mode: str,
    instance_count: int,
    gpu_uuid: str,
    seed: int,
    log_level: str,
) -> None:
    """Serve an emulated NVIDIA Triton: KServe v2 HTTP, gRPC and Triton's metrics port.

    Models `simple`, `simple_string` and `identity_fp32`; repository index, load and unload;
    Triton's nv_* metrics per model and version. Ready when GET /v2/health/ready returns 200.
    """
    from infermesh.core.logging import configure_logging
    from infermesh.dev.profiles import get_profile
    from infermesh.dev.triton_emulator import TritonEmulatorConfig, run_triton_emulator
    from infermesh.dev.triton_models import CATALOGUE

    configure_logging(log_level.lower(), "auto", component="triton-emulator")
    unknown = [name for name in models if name not in CATALOGUE]
    if unknown:
        raise click.BadParameter(
            f"unknown model(s) {', '.join(unknown)}; expected any of {', '.join(CATALOGUE)}",
            param_hint="--load-model",
        )
    config = TritonEmulatorConfig(
        models=tuple(dict.fromkeys(models)) or None,
        profile=get_profile(profile),
        explicit=model_control_mode.lower() == "explicit",
        instance_count=instance_count,
        gpu_uuid=gpu_uuid,
        seed=seed,
    )
    try:
        run_triton_emulator(config, host, http_port, grpc_port, metrics_port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}: {exc.strerror or exc}") from None


def _replica_map(values: tuple[str, ...]) -> dict[str, list[str]]:
    mapping: dict[str, list[str]] = {}
    for value in values:
        gpu, sep, url = value.partition("=")
        if not sep or not gpu.strip() or not url.strip().startswith(("http://", "https://")):
            raise click.BadParameter(
                f"{value!r} is not GPU=URL (GPU: a UUID or an index; URL: an emulated vLLM's "
                "base URL, e.g. 0=http://127.0.0.1:8001)",
                param_hint="--replica",
            )
        mapping.setdefault(gpu.strip(), []).append(url.strip())
    return mapping


@dev_group.command("dcgm")
@click.option("--port", type=click.IntRange(0, 65535), default=9400, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--gpus", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--uuid", "uuids", multiple=True, help="UUID of GPU 0, 1, ... [derived from --seed].")
@click.option("--mig", "mig", multiple=True, help="MIG profile created on every GPU (repeatable).")
@click.option(
    "--model-name",
    "model_names",
    multiple=True,
    help="GPU model name (NVML's), once for every GPU or once per GPU in order "
    "[default: NVIDIA H100 80GB HBM3].",
)
@click.option("--hostname", default="emulated-node", show_default=True)
@click.option(
    "--hostname-label",
    type=click.Choice(["Hostname", "hostname", "none"]),
    default="Hostname",
    show_default=True,
    help="`Hostname` as releases up to 4.5.3-4.8.2 write it, `hostname` as later ones, or none.",
)
@click.option(
    "--replica",
    "replicas",
    multiple=True,
    help="GPU=URL: an emulated vLLM on that GPU (UUID or index); its speed follows the GPU.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
def dcgm_command(
    port: int,
    host: str,
    gpus: int,
    uuids: tuple[str, ...],
    mig: tuple[str, ...],
    model_names: tuple[str, ...],
    hostname: str,
    hostname_label: str,
    replicas: tuple[str, ...],
    seed: int,
    log_level: str,
) -> None:
    """Serve an emulated NVIDIA dcgm-exporter whose GPUs can throttle, heat up or report an XID.

    GET /metrics is the exposition; POST /control/gpus/UUID {"state": "throttle"|"hot"|"xid"|
    "ecc"|"recover"} changes a GPU, and slows the --replica emulators on it through their
    /dev/speed route. GET /control/gpus lists the GPUs and their UUIDs.
    """
    from infermesh.core.logging import configure_logging
    from infermesh.dev.dcgm_emulator import DcgmEmulatorConfig, run_dcgm_emulator
    from infermesh.dev.dcgm_fleet import ControlError, DcgmFleet, DcgmFleetConfig

    configure_logging(log_level.lower(), "auto", component="dcgm-emulator")
    try:
        if len(model_names) == 1:
            model_names = model_names * gpus
        fleet = DcgmFleetConfig(
            gpus=gpus,
            model_names=model_names,
            mig=mig,
            hostname=hostname,
            hostname_label="" if hostname_label == "none" else hostname_label,
            seed=seed,
            uuids=uuids,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    known = [gpu.uuid for gpu in DcgmFleet(fleet).gpus]
    mapping: dict[str, tuple[str, ...]] = {}
    for gpu, urls in _replica_map(replicas).items():
        uuid = known[int(gpu)] if gpu.isdigit() and int(gpu) < len(known) else gpu
        if uuid not in known:
            raise click.BadParameter(
                f"no emulated GPU {gpu!r}; use an index below {gpus} or one of {', '.join(known)}",
                param_hint="--replica",
            )
        mapping[uuid] = (*mapping.get(uuid, ()), *urls)
    try:
        run_dcgm_emulator(DcgmEmulatorConfig(fleet=fleet, replicas=mapping), host, port)
    except ControlError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}: {exc.strerror or exc}") from None


@dev_group.command("up")
@click.option(
    "--replicas",
    type=click.IntRange(0, 32),
    default=3,
    show_default=True,
    help="Emulated vLLM servers.",
)
@click.option(
    "--triton",
    "tritons",
    type=click.IntRange(0, 32),
    default=0,
    show_default=True,
    help="Emulated Triton servers (KServe v2 HTTP and gRPC through the router).",
)
@click.option(
    "--dcgm",
    is_flag=True,
    help="Also start an emulated dcgm-exporter: one GPU per replica, read by the agent.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Router port (0 picks a free one).",
)
@click.option(
    "--profiles",
    default=DEFAULT_MESH_PROFILES,
    show_default=True,
    help="Comma list of emulator profiles, used in turn for the replicas.",
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@click.option(
    "--startup-timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the mesh to become ready.",
)
def up_command(
    replicas: int,
    tritons: int,
    dcgm: bool,
    port: int,
    profiles: str,
    model: str,
    log_level: str,
    startup_timeout: float,
) -> None:
    """Start agent + emulated vLLM (and Triton) servers + router as real processes, with an
    emulated dcgm-exporter for their GPUs under --dcgm; Ctrl-C stops them."""
    import asyncio

    from infermesh.dev.harness import MeshStartError, mesh_spec, run_until_interrupted

    if replicas + tritons < 1:
        raise click.UsageError("--replicas and --triton are both 0: the mesh needs a replica")
    spec = mesh_spec(
        replicas=replicas,
        profiles=_profile_list(profiles),
        model=model,
        router_port=port,
        log_level=log_level.lower(),
        ready_timeout_s=startup_timeout,
        tritons=tritons,
        dcgm=dcgm,
    )
    try:
        exit_code = asyncio.run(run_until_interrupted(spec, echo=click.echo))
    except MeshStartError as exc:
        click.echo(f"infermesh dev up: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        exit_code = 0
    raise SystemExit(exit_code)


@click.command("demo")
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=20.0,
    show_default=True,
    help="Seconds of load.",
)
@click.option("--replicas", type=click.IntRange(1, 8), default=3, show_default=True)
@click.option("--profiles", default=DEFAULT_MESH_PROFILES, show_default=True)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 512),
    default=12,
    show_default=True,
    help="Requests in flight at once.",
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--startup-timeout", type=click.FloatRange(min=1), default=60.0, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the request mix.")
def demo_command(
    duration: float,
    replicas: int,
    profiles: str,
    concurrency: int,
    model: str,
    startup_timeout: float,
    seed: int,
) -> None:
    """Start a local mesh, drive shared-prefix load through the router, print where it went."""
    import asyncio

    from infermesh.dev.demo import DemoFailed, run_demo
    from infermesh.dev.harness import MeshStartError, mesh_spec

    spec = mesh_spec(
        replicas=replicas,
        profiles=_profile_list(profiles),
        model=model,
        router_port=0,
        log_level="info",
        ready_timeout_s=startup_timeout,
    )
    try:
        asyncio.run(run_demo(spec, duration_s=duration, concurrency=concurrency, seed=seed))
    except (MeshStartError, DemoFailed) as exc:
        click.echo(f"infermesh demo: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo("infermesh demo: interrupted", err=True)
        raise SystemExit(130) from None

"""The ``lazytrace`` command line: boot | record | check | run | replay | kernels.

Exit status (DESIGN.md): 0 ok, 1 an invariant FAILed (not covered by ``--expect``), 2 usage or input error,
3 guest fault (no boot, panic, hang), 4 infrastructure fault (QEMU/gdb missing or died), 130 interrupted.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from . import __version__, kernels, paths, profiles, workloads
from .errors import LazytraceError

console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("lazytrace")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)])


def _fail(exc: LazytraceError) -> None:
    console.print(f"[bold red]lazytrace: error:[/] {exc.message}", highlight=False)
    details = exc.details()
    if details:
        console.print(details, highlight=False, markup=False)
    sys.exit(exc.exit_status)


def download_progress():
    """A rich progress bar usable as ``kernels.fetch(progress=...)``."""
    prog = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=console, transient=False)
    tasks: dict[str, int] = {}

    def cb(what: str, done: int, total: int) -> None:
        if not prog.live.is_started:
            prog.start()
        if what not in tasks:
            tasks[what] = prog.add_task(what, total=total or None)
        prog.update(tasks[what], completed=done, total=total or None)

    return prog, cb


def _run_dir(out: str | None, prefix: str) -> Path:
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        return d
    return paths.new_run_dir(prefix)


# Options shared by boot / record / run.
def guest_options(f):
    f = click.option("--kernel", default=kernels.DEFAULT_KERNEL, show_default=True,
                     help="guest kernel recipe (guest-kernels/NAME.toml)")(f)
    f = click.option("--profile", default=profiles.DEFAULT_PROFILE, show_default=True,
                     help="machine profile (qemu-configs/NAME.toml) or a path to a profile TOML")(f)
    f = click.option("--workload", default=workloads.DEFAULT_WORKLOAD, show_default=True,
                     help="built-in workload name or path to a workload directory")(f)
    f = click.option("--iterations", type=int, default=None, help="workload iterations (default: the workload's)")(f)
    f = click.option("--cpus", default="all", show_default=True, help="guest CPUs the workload runs on, e.g. 0,1")(f)
    f = click.option("--timeout", "timeout_s", type=float, default=None,
                     help="workload timeout in seconds (default: the workload's; scaled by the profile)")(f)
    f = click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="run directory (default: a new timestamped directory under runs/)")(f)
    return f


def _spec(kernel, profile, workload, iterations, cpus, timeout_s):
    from .runspec import RunSpec
    return RunSpec(kernel=kernel, profile=profile, workload=workload, iterations=iterations, cpus=cpus,
                   timeout_s=timeout_s)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lazytrace")
@click.option("-v", "--verbose", count=True, help="more logging (-vv for debug)")
def cli(verbose: int) -> None:
    """Trace a paravirt Linux guest under QEMU and check its lazy-MMU and preemption invariants."""
    _setup_logging(verbose)


@cli.command()
@guest_options
def boot(kernel, profile, workload, iterations, cpus, timeout_s, out) -> None:
    """Boot the guest, run a workload, power off (no tracing)."""
    from . import runspec
    from .boot import boot as do_boot
    try:
        spec = _spec(kernel, profile, workload, iterations, cpus, timeout_s)
        prog, cb = download_progress()
        with prog:
            resolved = runspec.resolve(spec, progress=cb)
        run_dir = _run_dir(out, "boot")
        with console.status("booting") as st:
            res = do_boot(resolved, run_dir, status=lambda msg: st.update(msg))
    except LazytraceError as exc:
        _fail(exc)
    console.print(f"boot: {res.boot_s:.2f} s to /init; workload window: {res.window_s:.2f} s; "
                  f"workload status: {res.workload_status}; clean poweroff")
    console.print(f"run directory: {res.run_dir}")


def record_options(f):
    f = click.option("--backend", type=click.Choice(["plugin", "gdb"]), default=None,
                     help="recorder: TCG plugin (guest speed; needs QEMU >= 10) or gdb stub "
                          "(default: plugin where supported)")(f)
    f = click.option("--arm", type=click.Choice(["marker", "boot"]), default="marker", show_default=True,
                     help="trace the workload window (between the marker syscalls) or from reset")(f)
    f = click.option("--emulate/--step", "emulate", default=None,
                     help="gdb backend: emulate trivially emulable probe instructions (one stop per event) "
                          "or single-step over them (default: the recorder's measured winner)")(f)
    f = click.option("--icount/--no-icount", default=True, show_default=True,
                     help="gdb backend: instruction-counted guest time, so stops do not let timer ticks "
                          "pile up in traced code (the observer effect)")(f)
    f = click.option("--replayable", is_flag=True,
                     help="record under QEMU icount record/replay (forces 1 vCPU: profile tcg-up-replay)")(f)
    return f


def _record(spec, backend, arm, emulate, replayable, out, prefix, icount=True):
    from . import record as rec
    from . import runspec
    if replayable:
        from dataclasses import replace
        spec = replace(spec, profile="tcg-up-replay")
    why = "asked for"
    if backend is None:
        backend, why = rec.default_backend()
        if backend == "plugin":
            from .errors import ToolMissingError
            from .plugin_build import ensure_plugin
            try:
                ensure_plugin()
            except ToolMissingError as exc:
                backend, why = "gdb", f"the TCG plugin cannot be built: {exc.message}"
        if backend == "gdb":
            log.warning("using the gdb backend: %s", why)
    prog, cb = download_progress()
    with prog:
        resolved = runspec.resolve(spec, progress=cb)
    run_dir = _run_dir(out, prefix)
    console.print(f"run directory: {run_dir}  (backend {backend}: {why})")
    return rec.record(resolved, run_dir, backend=backend, arm=arm, emulate=emulate, icount=icount,
                      console=console)


def _summary(res) -> None:
    boot = f"{res.boot_s:.1f} s" if res.boot_s is not None else "?"
    window = f"{res.window_s:.1f} s" if res.window_s is not None else "?"
    console.print(f"recorded {res.events:,} events ({res.events_lost} lost) with the {res.backend} backend; "
                  f"boot {boot}, workload window {window}; trace: {res.run_dir / 'trace.parquet'}")


@cli.command()
@guest_options
@record_options
def record(kernel, profile, workload, iterations, cpus, timeout_s, out, backend, arm, emulate, icount,
           replayable) -> None:
    """Boot the guest under a recorder and write a trace directory (no checking)."""
    try:
        res = _record(_spec(kernel, profile, workload, iterations, cpus, timeout_s), backend, arm, emulate,
                      replayable, out, "record", icount)
    except LazytraceError as exc:
        _fail(exc)
    _summary(res)


@cli.command()
@click.argument("trace_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--expect", "expect_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file of accepted known violations (id, site, reason)")
@click.option("--no-plots", is_flag=True, help="skip the timeline PNG and the Perfetto export")
def check(trace_dirs, expect_file, no_plots) -> None:
    """Check saved traces against the invariant catalogue; write report.json and report.md into each."""
    from analysis.check import check_dirs
    try:
        code = check_dirs([Path(d) for d in trace_dirs], expect_file=expect_file, console=console,
                          plots=not no_plots)
    except LazytraceError as exc:
        _fail(exc)
    sys.exit(code)


@cli.command()
@guest_options
@record_options
@click.option("--expect", "expect_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file of accepted known violations (id, site, reason)")
def run(kernel, profile, workload, iterations, cpus, timeout_s, out, backend, arm, emulate, icount, replayable,
        expect_file) -> None:
    """Record a guest run, then check it: the main job."""
    from analysis.check import check_dirs
    try:
        res = _record(_spec(kernel, profile, workload, iterations, cpus, timeout_s), backend, arm, emulate,
                      replayable, out, "run", icount)
        _summary(res)
        code = check_dirs([res.run_dir], expect_file=expect_file, console=console)
    except LazytraceError as exc:
        _fail(exc)
    sys.exit(code)


@cli.command()
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--backend", type=click.Choice(["plugin", "gdb"]), default="gdb", show_default=True,
              help="recorder attached to the replay")
@click.option("--arm", type=click.Choice(["marker", "boot"]), default="marker", show_default=True)
@click.option("--emulate/--step", "emulate", default=None)
@click.option("--out", type=click.Path(file_okay=False), default=None)
@click.option("--expect", "expect_file", type=click.Path(exists=True, dir_okay=False), default=None)
def replay(src_dir, backend, arm, emulate, out, expect_file) -> None:
    """Replay a --replayable run exactly (QEMU icount replay), traced, then check it.

    The replayed guest executes the very same instructions as the recording, so the gdb backend's stops
    no longer perturb it: need-resched and lazy-region counts are those of the recorded run.
    """
    from analysis.check import check_dirs

    from . import record as rec
    try:
        prog, cb = download_progress()
        with prog:
            resolved = rec.replay_resolved(Path(src_dir), progress=cb)
        run_dir = _run_dir(out, "replay")
        console.print(f"replaying {src_dir} into {run_dir} (backend {backend})")
        res = rec.record(resolved, run_dir, backend=backend, arm=arm, emulate=emulate, console=console)
        _summary(res)
        code = check_dirs([res.run_dir], expect_file=expect_file, console=console)
    except LazytraceError as exc:
        _fail(exc)
    sys.exit(code)


@cli.group(name="kernels")
def kernels_cmd() -> None:
    """List, fetch and verify guest kernels."""


@kernels_cmd.command(name="list")
def kernels_list() -> None:
    """Recipes, and what each resolves to in the cache."""
    for name in kernels.available():
        try:
            recipe = kernels.load_recipe(name)
        except LazytraceError as exc:
            console.print(f"{name:20s} [red]bad recipe[/]: {exc.message}")
            continue
        k = kernels.cached(recipe)
        state = f"fetched: {k.release} ({k.info.get('packages', {}).get('image', {}).get('version')})" if k \
            else "not fetched"
        default = " (default)" if name == kernels.DEFAULT_KERNEL else ""
        click.echo(f"{name:20s} {state:60s} {recipe.description}{default}")


@kernels_cmd.command(name="fetch")
@click.argument("name", default=kernels.DEFAULT_KERNEL)
def kernels_fetch(name: str) -> None:
    """Download and unpack a kernel (bzImage + DWARF vmlinux) into the cache, then verify it."""
    try:
        recipe = kernels.load_recipe(name)
        prog, cb = download_progress()
        with prog:
            k = kernels.fetch(recipe, progress=cb)
    except LazytraceError as exc:
        _fail(exc)
    click.echo(f"{name}: {k.release} in {k.directory} (build-id {k.build_id})")


@kernels_cmd.command(name="verify")
@click.argument("name", default=kernels.DEFAULT_KERNEL)
def kernels_verify(name: str) -> None:
    """Check that bzImage and vmlinux belong together, DWARF is present and the tracer's symbols resolve."""
    try:
        k = kernels.verify(name)
    except LazytraceError as exc:
        _fail(exc)
    click.echo(f"{name}: OK: {k.info['banner']}\n  build-id {k.build_id}")


@cli.group(name="xen")
def xen_cmd() -> None:
    """The Xen hypervisor of a xen-pv machine profile."""


@xen_cmd.command(name="fetch")
@click.argument("profile", default="xen-pv-smp2")
def xen_fetch(profile: str) -> None:
    """Download, unpack and verify the profile's hypervisor package into the cache (idempotent)."""
    from . import xen

    try:
        prof = profiles.load_profile(profile)
        prog, cb = download_progress()
        with prog:
            hv = xen.get_hypervisor(prof, progress=cb)
    except LazytraceError as exc:
        _fail(exc)
    click.echo(f"{profile}: Xen {hv.version} in {hv.image}")


def main() -> None:
    cli(prog_name="lazytrace")


if __name__ == "__main__":
    main()
